"""COCO-style evaluation of detections against a dataset's ground truth (pycocotools).

mAP is COCO's AP averaged over IoU 0.50:0.05:0.95, AP50 the AP at IoU 0.5, both over all areas with up to
100 detections per image; per-class AP is the mAP of one class. Classes without any ground-truth box in
the evaluated images get NaN per-class AP and do not enter the mean (COCO's convention).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from magral_core.boxes import xyxy_to_coco_xywh
from magral_core.datasets import to_coco_dict
from magral_core.structures import DetectionDataset, Detections


@dataclass(frozen=True)
class Evaluation:
    """COCO metrics in [0, 1]: `map` (AP@[.5:.95]), `ap50`, `per_class_ap` (class name → AP@[.5:.95]) and
    `per_class_ap50` (class name → AP at IoU 0.5)."""

    map: float
    ap50: float
    per_class_ap: dict[str, float]
    per_class_ap50: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"map": self.map, "ap50": self.ap50, "per_class_ap": dict(self.per_class_ap),
                "per_class_ap50": dict(self.per_class_ap50)}

    def summary(self) -> str:
        """One line: `mAP 0.512 AP50 0.873 (AP/AP50: RBC 0.450/0.800, WBC 0.700/0.990, ...)`."""
        classes = ", ".join(f"{name} {ap:.3f}/{self.per_class_ap50.get(name, float('nan')):.3f}"
                            for name, ap in self.per_class_ap.items())
        return f"mAP {self.map:.3f} AP50 {self.ap50:.3f} (AP/AP50: {classes})"


def coco_results(image_ids: Sequence[int], detections: Sequence[Detections]) -> list[dict[str, Any]]:
    """COCO result records of `detections[i]` on image `image_ids[i]` (xywh boxes, category id =
    label + 1)."""
    records = []
    for image_id, det in zip(image_ids, detections, strict=True):
        for box, score, label in zip(xyxy_to_coco_xywh(det.boxes_xyxy), det.scores, det.labels, strict=True):
            records.append({"image_id": int(image_id), "category_id": int(label) + 1,
                            "bbox": [float(v) for v in box], "score": float(score)})
    return records


def evaluate_coco(dataset: DetectionDataset, detections: Sequence[Detections]) -> Evaluation:
    """COCO metrics of `detections[i]` against `dataset.images[i]` (original pixels, 0-based labels).

    No detections at all gives 0.0 everywhere ground truth exists. Raises ValueError when the lengths differ,
    image ids repeat, or a label is outside the dataset's classes.
    """
    if len(detections) != len(dataset):
        raise ValueError(f"expected one Detections per image ({len(dataset)}), found {len(detections)}")
    names = dataset.class_names
    for det in detections:
        if len(det.labels) and (det.labels.min() < 0 or det.labels.max() >= len(names)):
            raise ValueError(f"detection labels must be within [0, {len(names) - 1}], found "
                             f"{det.labels.min()}..{det.labels.max()}")
    gt = to_coco_dict(dataset)
    has_gt = {a["category_id"] - 1 for a in gt["annotations"] if not a["iscrowd"]}
    results = coco_results([im.image_id for im in dataset.images], detections)
    if not results:  # pycocotools' loadRes cannot take an empty list
        per_class = {n: (0.0 if c in has_gt else float("nan")) for c, n in enumerate(names)}
        missing = 0.0 if has_gt else float("nan")
        return Evaluation(missing, missing, per_class, dict(per_class))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # (T IoUs, R recalls, K classes, A areas, M max-dets)
    per_class, per_class_50 = {}, {}
    for k, name in enumerate(names):
        per_class[name] = _mean_defined(precision[:, :, k, 0, -1])
        per_class_50[name] = _mean_defined(precision[0, :, k, 0, -1])  # IoU thresholds start at 0.50
    stats = evaluator.stats
    return Evaluation(_nan_if_missing(stats[0]), _nan_if_missing(stats[1]), per_class, per_class_50)


def _mean_defined(precision: np.ndarray) -> float:
    """Mean of the entries pycocotools defined (-1 marks a class without ground truth)."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else float("nan")


def _nan_if_missing(value: float) -> float:
    return float("nan") if value < 0 else float(value)


