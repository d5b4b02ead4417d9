"""The staging layout of a round: every file a round writes into its staging directory (and so into the
published version), its name and its format. The one owner of these names: stages, bindings, jobs, the
backend and the benchmarks read and write round files only through this module.

    round.json           `RoundPlan`: what `prepare` decided (tasks, split, strategy, record count)
    detector.pt          the round's detector checkpoint (`vision.checkpoint` format)
    pool.npz             detections and embeddings of the unlabeled pool, embeddings of the labeled set
    images.json          the round's image sets (train / val / pool) for jobs that rebuild them
    lut/record-NNNN.json look-up-table records, one file per record job
    proxy_cache.pt       the proxy's frozen features shared by the record jobs (deleted before publish)
    reward_cache.pt      another reward's one-off work shared by the record jobs (deleted before publish)
    labeled.npz          detections and embeddings of the labeled training images (`save_pool` format),
                         written by `prepare`, for the pool file and the rewards that read them (deleted
                         before publish)
    scores/chunk-NNNN.npz  detections and embeddings of one scoring chunk of the pool (`save_pool` format),
                         one file per scoring job, merged into pool.npz in pool order, then deleted
    magral_fit.pt        MAGRAL between its two stages of records (deleted before publish)
    policy.pt  lookup_table.json   MAGRAL's controller and records
    predictions.json     the predictions pushed to Label Studio, by task id
    ranking.json         the pool best first, with Label Studio scores and the strategy's priorities
    metrics.json         the round's validation metrics and bookkeeping (what `/status` shows)

Kept as one module because it is the one owner of the round's file names and formats.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.atomic import atomic_open, read_json, write_json
from magral_core.errors import StoreError
from magral_core.structures import AnnotatedImage, DetectionDataset, Detections
from magral_core.studio.label_config import LabelConfig

ROUND_FILE = "round.json"
POOL_FILE = "pool.npz"
DETECTOR_FILE = "detector.pt"
PREDICTIONS_FILE = "predictions.json"
IMAGES_FILE = "images.json"
POLICY_FILE = "policy.pt"
LOOKUP_TABLE_FILE = "lookup_table.json"
PROXY_CACHE_FILE = "proxy_cache.pt"  # MAGRAL proxy frozen features, shared by the record jobs; unpublished
MAGRAL_FIT_FILE = "magral_fit.pt"  # MAGRAL between its two stages of records; unpublished
REWARD_CACHE_FILE = "reward_cache.pt"  # a non-proxy reward's one-off work (`MAGRAL_REWARD`); unpublished
LABELED_FILE = "labeled.npz"  # labeled training images' detections and embeddings; unpublished
RANKING_FILE = "ranking.json"
METRICS_FILE = "metrics.json"
LUT_DIR = "lut"
SCORES_DIR = "scores"  # the pool's scoring chunks, until merged into POOL_FILE
# of no use once ranked (the caches are large)
UNPUBLISHED = (PROXY_CACHE_FILE, MAGRAL_FIT_FILE, REWARD_CACHE_FILE, LABELED_FILE)


@dataclass(frozen=True)
class TaskImage:
    """An unlabeled task of the pool: its id and the original size of its image."""

    task: int
    width: int
    height: int


@dataclass(frozen=True)
class RoundPlan:
    """What `prepare` decided, saved as `round.json` in the staging directory."""

    project: int
    version: str
    class_names: tuple[str, ...]
    label_config: dict[str, Any]
    strategy: str
    lut_records: int
    labeled_tasks: tuple[int, ...]
    validation_tasks: tuple[int, ...]
    pool: tuple[TaskImage, ...]
    skipped: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    scoring_chunks: int = 0
    """Scoring jobs the pool is split into (`chunk_bounds(len(pool), scoring_chunk)`); 0 = the pool was
    scored in the prepare job."""
    scoring_chunk: int = 0
    """Pool images per scoring chunk (the last one may hold fewer)."""

    def save(self, staging: Path) -> None:
        write_json(staging / ROUND_FILE, asdict(self))

    @staticmethod
    def load(staging: Path) -> RoundPlan:
        data = read_json(staging / ROUND_FILE)
        data["class_names"] = tuple(data["class_names"])
        data["labeled_tasks"] = tuple(data["labeled_tasks"])
        data["validation_tasks"] = tuple(data["validation_tasks"])
        data["pool"] = tuple(TaskImage(**p) for p in data["pool"])
        return RoundPlan(**data)

    @property
    def config(self) -> LabelConfig:
        c = self.label_config
        return LabelConfig(c["from_name"], c["to_name"], c["image_key"], tuple(c["labels"]))



# --- look-up-table records ---
def check_record(record: Mapping[str, Any]) -> None:
    """A record is {"indices": [pool positions], "value": number, "source": str, "seed": int}; raises
    StoreError naming what differs."""
    indices, value = record.get("indices"), record.get("value")
    if (
        not isinstance(indices, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
        or not isinstance(value, int | float)
        or isinstance(value, bool)
        or not isinstance(record.get("source"), str)
        or not isinstance(record.get("seed"), int)
    ):
        raise StoreError(
            "expected a record {indices: [pool positions], value: number, source: str, seed: int}, "
            f"found {dict(record)!r:.200}"
        )


def write_lut_record(staging: Path, index: int, record: Mapping[str, Any]) -> Path:
    """Write record `index` to `staging/lut/record-<index>.json` (checked first); returns its path."""
    check_record(record)
    path = staging / LUT_DIR / f"record-{index:04d}.json"
    write_json(path, dict(record))
    return path


def load_lut_records(staging: Path) -> list[dict[str, Any]]:
    """The records written so far, in index order (a failed record job leaves a gap, not an error)."""
    folder = staging / LUT_DIR
    return [read_json(p) for p in sorted(folder.glob("record-*.json"))] if folder.is_dir() else []


# --- pool arrays ---
def save_pool(
    path: Path, detections: Sequence[Detections], embeddings: np.ndarray, labeled_embeddings: np.ndarray
) -> None:
    """Detections of the pool (concatenated, with per-image offsets) and embeddings, in one .npz written
    atomically (a reader in another job sees the whole file or none)."""
    counts = np.array([len(d) for d in detections], np.int64)
    probs = [d.class_probs for d in detections]
    has_probs = bool(detections) and all(p is not None for p in probs)
    with atomic_open(path, "wb") as handle:
        np.savez(
            handle,
            counts=counts,
            boxes=np.concatenate([d.boxes_xyxy for d in detections]) if detections else np.zeros((0, 4)),
            scores=np.concatenate([d.scores for d in detections]) if detections else np.zeros(0),
            labels=np.concatenate([d.labels for d in detections]) if detections else np.zeros(0, np.int64),
            class_probs=np.concatenate(probs) if has_probs else np.zeros((0, 0)),  # type: ignore[arg-type]
            has_probs=np.array(has_probs),
            embeddings=embeddings,
            labeled_embeddings=labeled_embeddings,
        )


def load_pool(path: Path) -> dict[str, Any]:
    """{"detections": list[Detections], "embeddings": (N, D), "labeled_embeddings": (L, D)}."""
    with np.load(path) as data:
        offsets = np.concatenate([[0], np.cumsum(data["counts"])])
        has_probs = bool(data["has_probs"])
        detections = [
            Detections(
                data["boxes"][a:b].astype(np.float32),
                data["scores"][a:b].astype(np.float32),
                data["labels"][a:b].astype(np.int64),
                data["class_probs"][a:b].astype(np.float32) if has_probs else None,
            )
            for a, b in itertools.pairwise(offsets)
        ]
        return {
            "detections": detections,
            "embeddings": data["embeddings"],
            "labeled_embeddings": data["labeled_embeddings"],
        }


# --- the pool's scoring chunks ---
def chunk_bounds(pool_size: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) pool positions of each scoring chunk: consecutive, in pool order, `chunk` images each
    but the last; none for an empty pool. Raises ValueError when `chunk` < 1."""
    if chunk < 1:
        raise ValueError(f"expected a scoring chunk of at least 1 image, found {chunk}")
    return [(start, min(start + chunk, pool_size)) for start in range(0, pool_size, chunk)]


def chunk_path(staging: Path, index: int) -> Path:
    return staging / SCORES_DIR / f"chunk-{index:04d}.npz"


def write_pool_chunk(
    staging: Path, index: int, detections: Sequence[Detections], embeddings: np.ndarray
) -> Path:
    """Write scoring chunk `index` (its images' detections and embeddings, in pool order) atomically;
    returns its path."""
    path = chunk_path(staging, index)
    embeddings = np.asarray(embeddings)
    save_pool(path, detections, embeddings, np.zeros((0, embeddings.shape[1] if embeddings.ndim == 2 else 0)))
    return path


def merge_pool_chunks(staging: Path, bounds: Sequence[tuple[int, int]], labeled_embeddings: np.ndarray
                      ) -> Path:
    """Concatenate the scoring chunks of `bounds` in pool order into `POOL_FILE` (with the labeled
    embeddings), then delete them; returns the pool file's path. Raises StoreError naming the first chunk
    that is missing or holds another number of images than its bounds say (the pool file is not written
    then)."""
    detections: list[Detections] = []
    embeddings: list[np.ndarray] = []
    for index, (start, stop) in enumerate(bounds):
        path = chunk_path(staging, index)
        if not path.is_file():
            raise StoreError(f"expected scoring chunk {index} (pool images {start}-{stop - 1}) at {path}, "
                             "found nothing: its job failed or never ran")
        try:
            arrays = load_pool(path)
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"cannot read scoring chunk {index} at {path}: {exc}") from None
        if len(arrays["detections"]) != stop - start or len(arrays["embeddings"]) != stop - start:
            raise StoreError(f"expected {stop - start} images in scoring chunk {index} at {path}, found "
                             f"{len(arrays['detections'])} detections and {len(arrays['embeddings'])} "
                             "embeddings")
        detections += arrays["detections"]
        embeddings.append(np.asarray(arrays["embeddings"]))
    pooled = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)
    path = staging / POOL_FILE
    save_pool(path, detections, pooled, labeled_embeddings)
    for index in range(len(bounds)):
        chunk_path(staging, index).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (staging / SCORES_DIR).rmdir()
    return path


def save_images(path: Path, datasets: Mapping[str, DetectionDataset | None]) -> None:
    """The round's image sets (files, sizes, boxes, labels) as JSON, for jobs that rebuild them."""
    out: dict[str, Any] = {}
    for name, dataset in datasets.items():
        out[name] = (
            None
            if dataset is None
            else {
                "class_names": list(dataset.class_names),
                "images": [
                    {
                        "image_id": im.image_id,
                        "file_name": str(dataset.path(im)),
                        "width": im.width,
                        "height": im.height,
                        "boxes_xyxy": im.boxes_xyxy.tolist(),
                        "labels": im.labels.tolist(),
                        "split": im.split,
                    }
                    for im in dataset.images
                ],
            }
        )
    write_json(path, out)


def load_images(path: Path) -> dict[str, DetectionDataset | None]:
    """The image sets `save_images` wrote."""
    out: dict[str, DetectionDataset | None] = {}
    for name, data in read_json(path).items():
        out[name] = (
            None
            if data is None
            else DetectionDataset(
                Path("/"), tuple(data["class_names"]), tuple(AnnotatedImage(**im) for im in data["images"])
            )
        )
    return out


def load_predictions(version_dir: Path) -> dict[int, dict[str, Any]]:
    """The predictions a published version pushed, by task id (empty when the file is absent)."""
    path = version_dir / PREDICTIONS_FILE
    if not path.is_file():
        return {}
    return {int(k): v for k, v in read_json(path).items()}


def save_predictions(staging: Path, predictions: Sequence[Mapping[str, Any]]) -> None:
    """The predictions a round pushes, keyed by task id."""
    write_json(staging / PREDICTIONS_FILE, {str(p["task"]): dict(p) for p in predictions})


def save_ranking(staging: Path, ranking: Mapping[str, Any]) -> None:
    """`{"version", "strategy", "task_ids" best first, "scores", "priorities"}`."""
    write_json(staging / RANKING_FILE, dict(ranking))


def save_metrics(staging: Path, metrics: Mapping[str, Any]) -> None:
    write_json(staging / METRICS_FILE, dict(metrics))


def load_ranking(version_dir: Path) -> dict[str, Any]:
    data = read_json(version_dir / RANKING_FILE)
    return data if isinstance(data, dict) else {}


def load_metrics(version_dir: Path) -> Any:
    return read_json(version_dir / METRICS_FILE)
