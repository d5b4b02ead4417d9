"""What every importer shares: `JsonReader` (typed JSON access failing as one-line DataErrors),
`clean_image` and `build_dataset` (the cleaning conventions of `magral_core.datasets`), and seeded split
carving (`carve_splits`), which works on any `DetectionDataset` whatever its source format.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import numpy as np

from ..boxes import BoxesLike, clip_boxes_xyxy
from ..errors import DataError, UserError
from ..structures import AnnotatedImage, CleaningReport, DetectionDataset

log = logging.getLogger(__name__)

T = TypeVar("T")


# --- shared by the importers ----------------------------------------------------------------------------


def clean_image(
    image_id: int,
    file_name: str,
    width: int,
    height: int,
    boxes_xyxy: BoxesLike,
    labels: Sequence[int],
    iscrowd: Sequence[bool],
    split: str | None,
) -> tuple[AnnotatedImage, CleaningReport]:
    """Drop boxes of unknown class (label -1), clip the rest to the image, drop empty and outside ones."""
    label_array = np.asarray(labels, np.int64).reshape(-1)
    known = label_array >= 0
    clip = clip_boxes_xyxy(np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)[known], width, height)
    keep = clip.keep
    image = AnnotatedImage(
        image_id=image_id,
        file_name=file_name,
        width=width,
        height=height,
        boxes_xyxy=clip.boxes[keep].astype(np.float32),
        labels=label_array[known][keep],
        iscrowd=np.asarray(iscrowd, bool).reshape(-1)[known][keep],
        split=split,
    )
    report = CleaningReport(clip.num_clipped, clip.num_empty, clip.num_outside, int((~known).sum()))
    return image, report


def build_dataset(
    source: Path,
    root: Path,
    class_names: Sequence[str],
    parts: list[tuple[AnnotatedImage, CleaningReport]],
    *,
    unlabeled: int = 0,
) -> DetectionDataset:
    """The dataset of `clean_image` results, its report their sum plus `unlabeled` items left out.

    Raises DataError (naming `source`) when an image file is not found under `root`. Logs one line.
    """
    missing = [im.file_name for im, _ in parts if not (root / im.file_name).is_file()]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} of {len(parts)} image files not found under {root}, "
            f"first: {missing[0]}"
        )
    report = sum((r for _, r in parts), CleaningReport(unlabeled=unlabeled))
    dataset = DetectionDataset(root, tuple(class_names), tuple(im for im, _ in parts), report)
    log.info(
        "loaded dataset file=%s images=%d boxes=%d classes=%d splits=%s %s",
        source, len(dataset), sum(im.num_boxes for im in dataset.images), dataset.num_classes,
        dataset.splits(), " ".join(f"{k}={v}" for k, v in asdict(report).items()),
    )
    return dataset


class JsonReader:
    """Typed access to a parsed JSON file; every failure is a DataError `"<file>: <where>: <problem>"`."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, problem: str) -> NoReturn:
        raise DataError(f"{self.file}: {problem}")

    def load(self) -> Any:
        try:
            with open(self.file, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            self.fail("file not found")
        except (OSError, UnicodeDecodeError) as exc:
            self.fail(f"cannot read ({exc})")
        except json.JSONDecodeError as exc:
            self.fail(f"invalid JSON ({exc})")

    def field(self, obj: dict[str, Any], key: str, where: str, check: Callable[[Any, str], T]) -> T:
        """`obj[key]` passed through `check` (e.g. `as_int`); a missing key fails. `where=""`: top level."""
        if key not in obj:
            self.fail(f"{where or 'top level'}: missing key {key!r}")
        return check(obj[key], f"{where}.{key}" if where else key)

    def as_obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(f"{where}: expected an object, found {type(value).__name__}")
        return value

    def as_list(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(f"{where}: expected a list, found {type(value).__name__}")
        return value

    def as_int(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            self.fail(f"{where}: expected an integer, found {value!r}")
        return int(value)

    def as_num(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(f"{where}: expected a finite number, found {value!r}")
        return float(value)

    def as_str(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(f"{where}: expected a non-empty string, found {value!r}")
        return value


# --- splits ---------------------------------------------------------------------------------------------


def carve_splits(dataset: DetectionDataset, *, fractions: Mapping[str, float], seed: int) -> DetectionDataset:
    """Assign every image to one of the splits named in `fractions`, replacing any split it had.

    Counts are `fraction x N` rounded by largest remainder (ties to the earlier split), so they sum to N;
    when N is at least the number of splits, every split gets at least one image. Images are shuffled by
    `np.random.default_rng(seed)` in image-id order, so the result depends only on the seed, the fractions
    (and their order) and the set of image ids, not on the order of `dataset.images`. Raises UserError when
    a fraction is not positive or they do not sum to 1.
    """
    names = list(fractions)
    shares = np.array([fractions[n] for n in names], np.float64)
    if not names or (shares <= 0).any() or abs(shares.sum() - 1.0) > 1e-6:
        raise UserError(f"split fractions must be positive and sum to 1, found {dict(fractions)}")
    n = len(dataset)
    exact = shares * n
    counts = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    if n >= len(names):
        for k in np.flatnonzero(counts == 0):
            counts[np.argmax(counts)] -= 1
            counts[k] = 1
    by_id = np.argsort([im.image_id for im in dataset.images], kind="stable")  # (N,) positions
    shuffled = by_id[np.random.default_rng(seed).permutation(n)]  # (N,) positions
    split_index = np.empty(n, np.int64)
    split_index[shuffled] = np.repeat(np.arange(len(names)), counts)  # (N,) split index per position
    images = tuple(replace(im, split=names[s]) for im, s in zip(dataset.images, split_index, strict=True))
    return replace(dataset, images=images)
