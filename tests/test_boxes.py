"""Known answers for box conversions and clipping (values computed by hand in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from magral_core.boxes import (
    clip_boxes_xyxy,
    coco_xywh_to_xyxy,
    labelstudio_percent_to_xyxy,
    scale_boxes_xyxy,
    xyxy_to_coco_xywh,
    xyxy_to_labelstudio_percent,
)


def test_coco_xywh_and_xyxy_known_values_and_round_trip() -> None:
    xywh = np.array([[10, 20, 30, 40], [0, 0, 640, 480], [1.5, 2.5, 0, 1]])
    xyxy = np.array([[10, 20, 40, 60], [0, 0, 640, 480], [1.5, 2.5, 1.5, 3.5]])
    np.testing.assert_allclose(coco_xywh_to_xyxy(xywh), xyxy)
    np.testing.assert_allclose(xyxy_to_coco_xywh(xyxy), xywh)
    random = np.random.default_rng(0).uniform(0, 500, (50, 4))
    np.testing.assert_allclose(xyxy_to_coco_xywh(coco_xywh_to_xyxy(random)), random, atol=1e-9)


def test_empty_input_gives_zero_by_four() -> None:
    assert coco_xywh_to_xyxy([]).shape == (0, 4)
    assert labelstudio_percent_to_xyxy(np.zeros((0, 4)), 10, 10).shape == (0, 4)
    assert clip_boxes_xyxy(np.zeros((0, 4)), 10, 10).keep.shape == (0,)


def test_wrong_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        coco_xywh_to_xyxy(np.zeros((2, 5)))


def test_labelstudio_percent_known_values_and_round_trip() -> None:
    # 200 x 100 image: x 10% -> 20 px, y 20% -> 20 px, w 30% -> 60 px, h 40% -> 40 px.
    xyxy = labelstudio_percent_to_xyxy([[10, 20, 30, 40]], 200, 100)
    np.testing.assert_allclose(xyxy, [[20, 20, 80, 60]])
    np.testing.assert_allclose(xyxy_to_labelstudio_percent(xyxy, 200, 100), [[10, 20, 30, 40]])
    percent = np.random.default_rng(1).uniform(0, 50, (20, 4))
    back = xyxy_to_labelstudio_percent(labelstudio_percent_to_xyxy(percent, 640, 480), 640, 480)
    np.testing.assert_allclose(back, percent, atol=1e-9)


def test_labelstudio_rotation_about_top_left_corner() -> None:
    # 200 x 100 image, top-left (100, 10) px, w = 20% = 40 px, h = 30% = 30 px.
    # 90 deg clockwise (y down): width vector (40, 0) -> (0, 40), height vector (0, 30) -> (-30, 0).
    # Corners (100, 10), (100, 50), (70, 10), (70, 50) -> enclosing box (70, 10, 100, 50).
    # 180 deg: the box flips to the upper left of its anchor: (60, -20, 100, 10).
    # 45 deg, a 40 x 40 px square (w 20%, h 40%): corners (100, 10), (128.28, 38.28), (71.72, 38.28),
    # (100, 66.57).
    boxes = [[50, 10, 20, 30], [50, 10, 20, 30], [50, 10, 20, 40], [50, 10, 20, 30]]
    out = labelstudio_percent_to_xyxy(boxes, 200, 100, rotation=[90, 180, 45, 0])
    s = 40 / np.sqrt(2)
    expected = [[70, 10, 100, 50], [60, -20, 100, 10], [100 - s, 10, 100 + s, 10 + 2 * s], [100, 10, 140, 40]]
    np.testing.assert_allclose(out, expected, atol=1e-9)
    # A scalar rotation applies to every box; 360 deg is no rotation.
    np.testing.assert_allclose(labelstudio_percent_to_xyxy(boxes[:1], 200, 100, 360), [[100, 10, 140, 40]],
                               atol=1e-9)


def test_scale_boxes() -> None:
    np.testing.assert_allclose(scale_boxes_xyxy([[10, 20, 30, 40]], 0.5), [[5, 10, 15, 20]])
    np.testing.assert_allclose(scale_boxes_xyxy([[10, 20, 30, 40]], 2, 0.5), [[20, 10, 60, 20]])


def test_clip_masks_and_counts() -> None:
    boxes = np.array([
        [10, 10, 20, 20],      # inside: kept unchanged
        [-5, 10, 20, 60],      # partly outside: clipped to (0, 10, 20, 50)
        [110, 0, 120, 10],     # entirely right of the image
        [100, 0, 110, 10],     # touches the right edge only: outside
        [-10, -10, 0, 5],      # entirely left: outside
        [30, 30, 30, 40],      # zero width: empty
        [20, 20, 10, 30],      # inverted: empty
        [np.nan, 0, 5, 5],     # not finite: empty
        [0, 0, 100, 50],       # the whole image: kept unchanged
    ])
    result = clip_boxes_xyxy(boxes, 100, 50)
    np.testing.assert_array_equal(result.clipped, [0, 1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(result.outside, [0, 0, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(result.empty, [0, 0, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(result.keep, [1, 1, 0, 0, 0, 0, 0, 0, 1])
    assert (result.num_clipped, result.num_outside, result.num_empty) == (1, 3, 3)
    np.testing.assert_allclose(result.boxes[[0, 1, 8]], [[10, 10, 20, 20], [0, 10, 20, 50], [0, 0, 100, 50]])
    assert np.isnan(boxes[7, 0]), "input must not be modified"
