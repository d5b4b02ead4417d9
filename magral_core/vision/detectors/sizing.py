"""The network input size chosen from the labeled boxes: large enough that small boxes reach a size the
detector's finest level and smallest anchors resolve, within a configured maximum.

Pure arithmetic on box sides; `engine.chosen_image_size` reads them from a dataset.
"""

from __future__ import annotations

import math

import numpy as np

SMALL_QUANTILE = 0.05  # the box side that 95% of the labeled boxes exceed stands for "the small ones"
TARGET_SIDE = 32.0  # pixels at the network input: two cells of the stride-16 level, the 32-px anchor
SIZE_MULTIPLE = 32  # the coarsest stride: inputs that are multiples of it pad nothing


def box_sides_at(widths: np.ndarray, heights: np.ndarray, longest_sides: np.ndarray, image_size: int
                 ) -> np.ndarray:
    """sqrt(w * h) of each box once its image is resized so that its longest side is `image_size`."""
    scale = image_size / np.asarray(longest_sides, dtype=np.float64)
    return np.sqrt(np.asarray(widths, np.float64) * np.asarray(heights, np.float64)) * scale


def image_size_for(sides_at_base: np.ndarray, base: int, maximum: int, *,
                   quantile: float = SMALL_QUANTILE, target: float = TARGET_SIDE) -> int:
    """`base` when the `quantile` of the box sides (measured at `base`) is at least `target` px (or there
    are no boxes, or `maximum` <= `base`); else the size that brings it to `target`, rounded up to a
    multiple of SIZE_MULTIPLE and capped at `maximum`."""
    sides = np.asarray(sides_at_base, dtype=np.float64)
    sides = sides[np.isfinite(sides) & (sides > 0)]
    if maximum <= base or len(sides) == 0:
        return base
    small = float(np.quantile(sides, quantile))
    if small >= target:
        return base
    wanted = math.ceil(base * target / small / SIZE_MULTIPLE) * SIZE_MULTIPLE
    return int(min(maximum, max(base, wanted)))
