"""Rankings → Label Studio scores (best lowest) and detections → LS result items, with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from magral_core.structures import Detections
from magral_core.studio.label_config import LabelConfig
from magral_core.studio.results import (
    detections_to_results,
    restrict_to_config,
    scores_from_order,
    task_prediction,
)

CONFIG = LabelConfig("label", "image", "image", ("RBC", "WBC"))


def test_scores_from_order_gives_the_best_the_lowest_score() -> None:
    scores = scores_from_order([2, 0, 3, 1], 4)
    np.testing.assert_allclose(scores, [1 / 3, 1.0, 0.0, 2 / 3])
    assert np.argsort(scores).tolist() == [2, 0, 3, 1]  # Label Studio's lowest-first order = the ranking
    assert scores_from_order([0], 1).tolist() == [0.0]
    assert scores_from_order([], 0).shape == (0,)


@pytest.mark.parametrize("order", [[0, 0, 1], [0, 1], [0, 1, 3]])
def test_scores_from_order_rejects_what_is_not_a_permutation(order: list[int]) -> None:
    with pytest.raises(ValueError, match="covering all 3 pool positions"):
        scores_from_order(order, 3)


def test_detections_to_results_in_percent_with_threshold_and_known_labels() -> None:
    det = Detections(
        np.array([[64, 48, 320, 240], [0, 0, 10, 10], [600, 400, 700, 500], [1, 1, 2, 2]], np.float32),
        np.array([0.9, 0.2, 0.8, 0.95], np.float32),
        np.array([1, 0, 0, 2]),  # class 2 ("Platelets") was removed from the config
    )
    items = detections_to_results(
        det, width=640, height=480, class_names=("RBC", "WBC", "Platelets"), config=CONFIG, threshold=0.5
    )
    assert len(items) == 2  # below threshold and unknown label dropped
    first, second = items
    assert first["value"] == {
        "x": 10.0,
        "y": 10.0,
        "width": 40.0,
        "height": 40.0,
        "rotation": 0,
        "rectanglelabels": ["WBC"],
    }
    assert (
        first["score"] == pytest.approx(0.9) and first["from_name"] == "label" and first["to_name"] == "image"
    )
    assert (first["original_width"], first["original_height"]) == (640, 480)
    # partly outside: clipped to the image, (600, 400, 640, 480)
    assert second["value"]["x"] == pytest.approx(93.75) and second["value"]["width"] == pytest.approx(6.25)
    assert second["value"]["height"] == pytest.approx(16.6667, abs=1e-3)


def test_no_detections_give_no_items() -> None:
    assert (
        detections_to_results(
            Detections.empty(), width=10, height=10, class_names=("RBC",), config=CONFIG, threshold=0.0
        )
        == []
    )


def test_restrict_to_config_readdresses_and_drops_removed_labels() -> None:
    stored = [
        {"from_name": "old", "to_name": "old_img", "value": {"rectanglelabels": [name]}}
        for name in ("RBC", "Platelets")
    ]
    kept = restrict_to_config(stored, CONFIG)
    assert kept == [{"from_name": "label", "to_name": "image", "value": {"rectanglelabels": ["RBC"]}}]


def test_task_prediction_shape() -> None:
    assert task_prediction(7, [], 0.25, "magral-1-v0002") == {
        "task": 7,
        "result": [],
        "score": 0.25,
        "model_version": "magral-1-v0002",
    }
