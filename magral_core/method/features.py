"""Per-image features from one detector pass: backbone embedding + detection statistics.

The same features feed the look-up-table surrogate, the controller, the baselines and the ranking, so they
are computed once per image and detector version (`FeatureCache`).

Detection statistics (`STAT_NAMES`, one value each per image):

- `entropy_mean`, `entropy_max`: class entropy (nats) of the `top_k` highest-scoring detections. With
  `class_probs` it is the entropy of the full softmax (background column included); without it, the binary
  entropy of the detection score. An image with no detections gets 0 for both.
- `score_max`, `score_mean`: over all detections; 0 when there are none.
- `confident`: number of detections with score >= `confident_threshold`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from magral_core.atomic import atomic_open
from magral_core.errors import DataError
from magral_core.structures import Detections

STAT_NAMES: tuple[str, ...] = ("entropy_mean", "entropy_max", "score_max", "score_mean", "confident")

_EPS = 1e-12


def class_distributions(detections: Detections) -> np.ndarray:
    """(K, C') probability rows per detection: `class_probs` renormalised, else (score, 1 - score)."""
    if detections.class_probs is not None:
        probs = np.asarray(detections.class_probs, dtype=np.float64).reshape(len(detections), -1)
        return probs / np.maximum(probs.sum(axis=1, keepdims=True), _EPS)
    s = np.clip(np.asarray(detections.scores, dtype=np.float64), 0.0, 1.0)
    return np.stack([s, 1.0 - s], axis=1)  # (K, 2)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats of each row of `probs` (rows sum to 1); 0·log 0 = 0."""
    p = np.asarray(probs, dtype=np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


def detection_stats(
    detections: Detections, *, top_k: int = 10, confident_threshold: float = 0.5
) -> np.ndarray:
    """The `STAT_NAMES` vector (float64) of one image's detections."""
    if len(detections) == 0:
        return np.zeros(len(STAT_NAMES))
    scores = np.asarray(detections.scores, dtype=np.float64)
    top = np.argsort(-scores, kind="stable")[:top_k]
    ent = entropy(class_distributions(detections)[top])
    return np.array(
        [ent.mean(), ent.max(), scores.max(), scores.mean(), float((scores >= confident_threshold).sum())]
    )


def image_features(
    embedding: np.ndarray, detections: Detections, *, top_k: int = 10, confident_threshold: float = 0.5
) -> np.ndarray:
    """Raw (unnormalised) feature vector of one image: embedding (D,) followed by `detection_stats`."""
    emb = np.asarray(embedding, dtype=np.float64).reshape(-1)
    stats = detection_stats(detections, top_k=top_k, confident_threshold=confident_threshold)
    return np.concatenate([emb, stats])


def normalise(features: np.ndarray) -> np.ndarray:
    """Z-score each column over the rows (the pool); a constant column becomes 0. Returns float32 (N, F)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an (N, F) feature matrix, found shape {x.shape}")
    if len(x) == 0:
        return x.astype(np.float32)
    std = x.std(axis=0)
    out = (x - x.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
    return out.astype(np.float32)


def pool_features(
    embeddings: np.ndarray,
    detections: Sequence[Detections],
    *,
    top_k: int = 10,
    confident_threshold: float = 0.5,
) -> np.ndarray:
    """(N, D + len(STAT_NAMES)) features of a pool, every column normalised over the pool.

    Raises ValueError when the embeddings and detections disagree on the pool size.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or len(emb) != len(detections):
        raise ValueError(
            f"expected embeddings of shape (N, D) for N={len(detections)} detections, found {emb.shape}"
        )
    stats = np.array(
        [detection_stats(d, top_k=top_k, confident_threshold=confident_threshold) for d in detections]
    ).reshape(len(emb), -1)
    return normalise(np.concatenate([emb, stats], axis=1))


class FeatureCache:
    """One `.npz` per image and detector version: `<root>/<version>/<image_id>.npz`.

    Stores the embedding and the detections (boxes, scores, labels, class_probs), so every strategy can be
    recomputed without another forward pass. Writes are atomic (temporary file + rename), so a killed
    writer never leaves a half-written entry.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, image_id: int | str, version: str) -> Path:
        return self.root / str(version) / f"{image_id}.npz"

    def get(self, image_id: int | str, version: str) -> tuple[np.ndarray, Detections] | None:
        """(embedding, detections) or None when absent. Raises DataError for an unreadable entry."""
        path = self.path(image_id, version)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                probs = data["class_probs"] if "class_probs" in data.files else None
                det = Detections(data["boxes_xyxy"], data["scores"], data["labels"], probs)
                return data["embedding"], det
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"feature cache entry {path} is unreadable: {exc}") from exc

    def put(self, image_id: int | str, version: str, embedding: np.ndarray, detections: Detections) -> Path:
        path = self.path(image_id, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "embedding": np.asarray(embedding, dtype=np.float32),
            "boxes_xyxy": np.asarray(detections.boxes_xyxy, dtype=np.float32),
            "scores": np.asarray(detections.scores, dtype=np.float32),
            "labels": np.asarray(detections.labels, dtype=np.int64),
        }
        if detections.class_probs is not None:
            arrays["class_probs"] = np.asarray(detections.class_probs, dtype=np.float32)
        with atomic_open(path, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        return path
