"""[ours] Pseudo-label look-ahead: the value of a batch is the validation mAP after its images enter as
labeled with the current detector's confident predictions.

The round's detector is frozen up to the box head's fc6 (`heads.TailFeatures`, computed once per image and
cached); a record trains the tail (fc7 + box predictor, from the detector's weights) on the labeled training
images with their true boxes plus the batch's images with their pseudo boxes (detections scoring at least
`threshold`), then measures COCO mAP on the validation part. Cost per record: one head training on cached
features plus one pass of the tail over the validation images; the caching is one backbone pass per image
(and its flip) for the round, shareable between processes (`warm`, `save`, `load`). The batch's true labels
are never read: the pool's images enter through the detections handed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.method.rewards.heads import HeadSettings, TailFeatures, tail_map, train_tail
from magral_core.structures import AnnotatedImage, DetectionDataset, Detections

CACHE_FORMAT = 1
"""Version of the file `PseudoLabelReward.save` writes."""


def pseudo_labeled(pool: DetectionDataset, detections: Sequence[Detections], threshold: float
                   ) -> DetectionDataset:
    """`pool` with every image's boxes replaced by its detections scoring >= `threshold` (its own boxes,
    if any, dropped). Raises ValueError when the counts differ."""
    if len(detections) != len(pool):
        raise ValueError(f"expected one Detections per pool image ({len(pool)}), found {len(detections)}")
    images: list[AnnotatedImage] = []
    for image, det in zip(pool.images, detections, strict=True):
        keep = np.asarray(det.scores) >= threshold
        images.append(replace(image, boxes_xyxy=np.asarray(det.boxes_xyxy, np.float32).reshape(-1, 4)[keep],
                              labels=np.asarray(det.labels, np.int64)[keep],
                              iscrowd=np.zeros(int(keep.sum()), bool)))
    return replace(pool, images=tuple(images))


class PseudoLabelReward:
    """`evaluate(indices, seed) -> mAP` of the tail trained on the labeled images + pseudo-labeled pool
    images at `indices` (positions in `pool`), on `val`."""

    def __init__(self, model: Any, labeled: DetectionDataset, pool: DetectionDataset,
                 pool_detections: Sequence[Detections], val: DetectionDataset, *, threshold: float = 0.5,
                 settings: HeadSettings | None = None) -> None:
        self.model, self.settings = model, settings or HeadSettings()
        self.labeled = TailFeatures(model, labeled)
        self.pool = TailFeatures(model, pseudo_labeled(pool, pool_detections, threshold))
        self.val = TailFeatures(model, val)

    def warm(self, pool_indices: Iterable[int] = ()) -> None:
        """Cache the round's one-off work: every labeled image's targets, every validation image and the
        pseudo-labeled targets of the pool images at `pool_indices`."""
        for i in range(len(self.labeled.dataset)):
            self.labeled.targets(i)
        for i in range(len(self.val.dataset)):
            self.val[i]
        for i in pool_indices:
            self.pool.targets(int(i))

    def save(self, path: Path) -> None:
        """Write the frozen features computed so far to `path` atomically (whole files only, for concurrent
        readers)."""
        import torch

        from magral_core.atomic import atomic_open

        state = {"format": CACHE_FORMAT, "kind": "pseudo_label", "labeled": self.labeled.state(),
                 "pool": self.pool.state(), "val": self.val.state()}
        with atomic_open(path, "wb") as handle:
            torch.save(state, handle)

    def load(self, path: Path) -> None:
        """Adopt what `save` wrote for the same model and images (nothing is recomputed for them). Raises
        ValueError for another format or other images; OSError/pickle errors for an unreadable file."""
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if (not isinstance(state, dict) or state.get("format") != CACHE_FORMAT
                or state.get("kind") != "pseudo_label"):
            raise ValueError(f"{path}: expected a pseudo-label reward cache of format {CACHE_FORMAT}")
        for name in ("labeled", "pool", "val"):
            getattr(self, name).load_state(state[name])

    def __call__(self, indices: np.ndarray, seed: int) -> float:
        labeled = [self.labeled.targets(i) for i in range(len(self.labeled.dataset))]
        extra = [self.pool.targets(int(i)) for i in np.asarray(indices).reshape(-1)]
        tail = train_tail(self.model, labeled, extra, self.settings, seed=seed)
        return tail_map(tail, self.val, self.settings.score_threshold)

    evaluate = __call__
