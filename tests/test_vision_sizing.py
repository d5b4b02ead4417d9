"""The input size chosen from box sides: known answers, bounds, and no boxes."""

from __future__ import annotations

import numpy as np
import pytest

from magral_core.vision.detectors.sizing import box_sides_at, image_size_for


def test_box_sides_follow_the_resize() -> None:
    sides = box_sides_at(np.array([40.0, 10.0]), np.array([10.0, 10.0]), np.array([640, 320]), 320)
    assert sides.tolist() == pytest.approx([10.0, 10.0])


def test_large_boxes_keep_the_base_size() -> None:
    assert image_size_for(np.full(100, 60.0), 448, 800) == 448


def test_small_boxes_raise_the_size_to_reach_the_target() -> None:
    # 5% quantile 29.3 px at 448: 448 * 32 / 29.3 = 489.3 -> 512
    sides = np.concatenate([np.full(6, 29.3), np.full(94, 70.0)])
    assert image_size_for(sides, 448, 800) == 512
    assert image_size_for(sides, 448, 480) == 480  # capped
    assert image_size_for(np.full(10, 8.0), 448, 2000) == 1792  # 448 * 4


def test_no_boxes_or_no_room_keep_the_base() -> None:
    assert image_size_for(np.zeros(0), 448, 800) == 448
    assert image_size_for(np.full(10, 8.0), 448, 448) == 448
    assert image_size_for(np.full(10, 8.0), 448, 0) == 448
