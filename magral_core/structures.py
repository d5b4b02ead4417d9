"""Typed records shared by every module: annotated images, datasets and detections.

Box convention inside the project: absolute pixel corners `(x1, y1, x2, y2)` in the image's own pixel grid
("xyxy"), float32. Class labels are 0-based indices into the dataset's `class_names`; the detectors add the
background offset themselves. `magral_core.boxes` converts from and to every other convention.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np


def _boxes(array: np.ndarray | Sequence[Sequence[float]] | None) -> np.ndarray:
    out = np.asarray(array if array is not None else np.zeros((0, 4)), dtype=np.float32)
    return out.reshape(-1, 4)


@dataclass(frozen=True, eq=False)
class AnnotatedImage:
    """One image and its ground-truth boxes.

    `boxes_xyxy` is (N, 4) absolute pixels; `labels` (N,) 0-based class indices; `iscrowd` (N,) bool.
    `file_name` is relative to the dataset root, or absolute.
    """

    image_id: int
    file_name: str
    width: int
    height: int
    boxes_xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    split: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "boxes_xyxy", _boxes(self.boxes_xyxy))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64).reshape(-1))
        crowd = np.zeros(len(self.labels), bool) if len(self.iscrowd) == 0 else self.iscrowd
        object.__setattr__(self, "iscrowd", np.asarray(crowd, dtype=bool).reshape(-1))
        n = len(self.boxes_xyxy)
        if len(self.labels) != n or len(self.iscrowd) != n:
            raise ValueError(
                f"image {self.image_id}: {n} boxes but {len(self.labels)} labels and {len(self.iscrowd)} "
                "crowd flags; expected one of each per box"
            )

    @property
    def num_boxes(self) -> int:
        return len(self.boxes_xyxy)


@dataclass(frozen=True)
class CleaningReport:
    """What an importer changed to make boxes valid: counts, never silent."""

    clipped: int = 0
    """Boxes partly outside the image, clipped to it."""
    dropped_empty: int = 0
    """Boxes of zero width or height (after clipping), dropped."""
    dropped_outside: int = 0
    """Boxes entirely outside the image, dropped."""
    unknown_labels: int = 0
    """Boxes whose label is not a known class, dropped."""
    unlabeled: int = 0
    """Tasks without a usable annotation, left out."""

    def __add__(self, other: CleaningReport) -> CleaningReport:
        return CleaningReport(
            self.clipped + other.clipped,
            self.dropped_empty + other.dropped_empty,
            self.dropped_outside + other.dropped_outside,
            self.unknown_labels + other.unknown_labels,
            self.unlabeled + other.unlabeled,
        )

    @property
    def changed(self) -> int:
        return self.clipped + self.dropped_empty + self.dropped_outside + self.unknown_labels


@dataclass(frozen=True, eq=False)
class DetectionDataset:
    """Images with boxes, the class names their labels index, and where the image files lie."""

    root: Path
    class_names: tuple[str, ...]
    images: tuple[AnnotatedImage, ...]
    report: CleaningReport = CleaningReport()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Foreground classes (no background)."""
        return len(self.class_names)

    def path(self, image: AnnotatedImage) -> Path:
        """Absolute path of an image's file."""
        p = Path(image.file_name)
        return p if p.is_absolute() else self.root / p

    def splits(self) -> dict[str, int]:
        """Image count per split name (images without a split are counted under "")."""
        counts: dict[str, int] = {}
        for image in self.images:
            counts[image.split or ""] = counts.get(image.split or "", 0) + 1
        return counts

    def split(self, *names: str) -> DetectionDataset:
        """The images whose split is one of `names`; raises KeyError naming the known splits if none match."""
        chosen = tuple(im for im in self.images if im.split in names)
        if not chosen:
            raise KeyError(f"no images in split(s) {list(names)}; known splits: {sorted(self.splits())}")
        return replace(self, images=chosen)

    def subset(self, indices: Iterable[int]) -> DetectionDataset:
        """The images at the given positions, in that order."""
        return replace(self, images=tuple(self.images[i] for i in indices))


@dataclass(frozen=True, eq=False)
class Detections:
    """A detector's output for one image, in that image's original pixel grid.

    `boxes_xyxy` (K, 4) float32; `scores` (K,) in [0, 1]; `labels` (K,) 0-based class indices;
    `class_probs` (K, C + 1) softmax over background (column 0) and the C classes, when the detector
    exposes it (used by uncertainty strategies), else None.
    """

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_probs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty(num_classes: int | None = None) -> Detections:
        probs = None if num_classes is None else np.zeros((0, num_classes + 1), np.float32)
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), probs)
