"""COCO evaluation: known answers for perfect, empty, partial and badly localised detections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from magral_core.structures import AnnotatedImage, DetectionDataset, Detections
from magral_core.vision.evaluation import evaluate_coco


def _dataset() -> DetectionDataset:
    images = (
        AnnotatedImage(10, "a.png", 200, 100, np.array([[0, 0, 100, 100], [120, 10, 180, 60]], np.float32),
                       np.array([0, 1])),
        AnnotatedImage(11, "b.png", 200, 100, np.array([[50, 20, 150, 80]], np.float32), np.array([0])),
        AnnotatedImage(12, "c.png", 200, 100),  # no boxes
    )
    return DetectionDataset(Path("."), ("cell", "blob"), images)


def _dets(boxes: list[list[float]], labels: list[int], scores: list[float] | None = None) -> Detections:
    scores = scores if scores is not None else [0.9] * len(labels)
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(labels, np.int64))


def _perfect(dataset: DetectionDataset) -> list[Detections]:
    return [_dets(im.boxes_xyxy.tolist(), im.labels.tolist()) for im in dataset.images]


def test_perfect_detections_score_one() -> None:
    dataset = _dataset()
    result = evaluate_coco(dataset, _perfect(dataset))
    assert result.map == pytest.approx(1.0) and result.ap50 == pytest.approx(1.0)
    assert result.per_class_ap == pytest.approx({"cell": 1.0, "blob": 1.0})


def test_no_detections_score_zero() -> None:
    dataset = _dataset()
    result = evaluate_coco(dataset, [Detections.empty()] * 3)
    assert result.map == 0.0 and result.ap50 == 0.0 and result.per_class_ap == {"cell": 0.0, "blob": 0.0}
    assert result.per_class_ap50 == {"cell": 0.0, "blob": 0.0}


def test_half_recall_gives_coco_101_point_ap() -> None:
    # "cell": one of two boxes found (precision 1 up to recall 0.5): AP = 51 of 101 recall points.
    # "blob": found exactly: AP 1. The mean over classes is the mAP.
    dataset = _dataset()
    found = _dets([[0, 0, 100, 100], [120, 10, 180, 60]], [0, 1])
    detections = [found, Detections.empty(), Detections.empty()]
    result = evaluate_coco(dataset, detections)
    assert result.per_class_ap["cell"] == pytest.approx(51 / 101)
    assert result.per_class_ap["blob"] == pytest.approx(1.0)
    assert result.per_class_ap50 == pytest.approx({"cell": 51 / 101, "blob": 1.0})
    assert result.map == pytest.approx((51 / 101 + 1.0) / 2)


def test_iou_062_counts_at_three_of_ten_thresholds() -> None:
    # One class, one box: a detection covering 62% of it (IoU 0.62) matches at IoU 0.50, 0.55, 0.60 only.
    image = AnnotatedImage(1, "a.png", 100, 100, np.array([[0, 0, 100, 100]], np.float32), np.array([0]))
    dataset = DetectionDataset(Path("."), ("cell",), (image,))
    result = evaluate_coco(dataset, [_dets([[0, 0, 100, 62]], [0])])
    assert result.ap50 == pytest.approx(1.0)
    assert result.map == pytest.approx(0.3)
    assert result.per_class_ap == pytest.approx({"cell": 0.3})
    assert result.per_class_ap50 == pytest.approx({"cell": 1.0})


def test_false_positive_ranked_first_lowers_ap() -> None:
    # A wrong box scored above the right one: precision 0.5 at recall 1 → AP 0.5 at every threshold.
    image = AnnotatedImage(1, "a.png", 100, 100, np.array([[0, 0, 50, 50]], np.float32), np.array([0]))
    dataset = DetectionDataset(Path("."), ("cell",), (image,))
    result = evaluate_coco(dataset, [_dets([[60, 60, 90, 90], [0, 0, 50, 50]], [0, 0], [0.9, 0.8])])
    assert result.map == pytest.approx(0.5) and result.ap50 == pytest.approx(0.5)


def test_class_without_ground_truth_is_nan_and_length_mismatch_is_an_error() -> None:
    image = AnnotatedImage(1, "a.png", 100, 100, np.array([[0, 0, 50, 50]], np.float32), np.array([0]))
    dataset = DetectionDataset(Path("."), ("cell", "never"), (image,))
    result = evaluate_coco(dataset, [_dets([[0, 0, 50, 50]], [0])])
    assert result.map == pytest.approx(1.0) and np.isnan(result.per_class_ap["never"])
    with pytest.raises(ValueError, match="one Detections per image"):
        evaluate_coco(dataset, [])
    with pytest.raises(ValueError, match="labels must be within"):
        evaluate_coco(dataset, [_dets([[0, 0, 50, 50]], [5])])


def test_pycocotools_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    dataset = _dataset()
    evaluate_coco(dataset, _perfect(dataset))
    assert capsys.readouterr().out == ""
