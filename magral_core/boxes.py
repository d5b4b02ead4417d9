"""Box conventions and the conversions between them; every other module goes through here.

Formats (all arrays are (N, 4), one row per box, vectorised over N):

- xyxy: absolute pixel corners `(x1, y1, x2, y2)`, continuous coordinates in the image's pixel grid, so a
  box covering the whole W x H image is `(0, 0, W, H)`. The project's internal format (torchvision's too).
- COCO xywh: absolute `(x, y, width, height)` with `(x, y)` the top-left corner, same grid as xyxy.
- Label Studio percent: `(x, y, width, height)` in percent (0-100) of the image width (x, width) and height
  (y, height), `(x, y)` the top-left corner before rotation, plus a `rotation` in degrees, clockwise on
  screen, about that top-left corner.

Every function returns a new float64 array and never modifies its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BoxesLike = np.ndarray | Sequence[Sequence[float]]


def _as_boxes(boxes: BoxesLike) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"expected boxes of shape (N, 4), found shape {array.shape}")
    return array


def coco_xywh_to_xyxy(boxes: BoxesLike) -> np.ndarray:
    """COCO `(x, y, w, h)` absolute → `(x1, y1, x2, y2)` absolute; (N, 4) → (N, 4)."""
    b = _as_boxes(boxes)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def xyxy_to_coco_xywh(boxes: BoxesLike) -> np.ndarray:
    """`(x1, y1, x2, y2)` absolute → COCO `(x, y, w, h)` absolute; (N, 4) → (N, 4)."""
    b = _as_boxes(boxes)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def labelstudio_percent_to_xyxy(
    boxes: BoxesLike, width: float, height: float, rotation: np.ndarray | Sequence[float] | float = 0.0
) -> np.ndarray:
    """Label Studio `(x, y, w, h)` percent + rotation (degrees) → absolute xyxy in a `width` x `height` image.

    `boxes` is (N, 4); `rotation` a scalar or (N,). A rotated rectangle becomes the axis-aligned box that
    encloses it: its corners are turned in pixel space (not percent space, whose axes have different
    scales) about the top-left corner `(x, y)`, clockwise on screen (y points down). Returns (N, 4).
    """
    b = _as_boxes(boxes)
    scale = np.array([width, height, width, height], np.float64) / 100.0
    x, y, w, h = (b * scale).T  # each (N,)
    theta = np.deg2rad(np.broadcast_to(np.asarray(rotation, np.float64), x.shape))
    cos, sin = np.cos(theta), np.sin(theta)
    # Corner offsets from (x, y) before rotation: (0, 0), (w, 0), (0, h), (w, h); after rotation by theta
    # (clockwise on a y-down screen): (dx cos - dy sin, dx sin + dy cos).
    dx = np.stack([np.zeros_like(w), w * cos, -h * sin, w * cos - h * sin], axis=1)  # (N, 4 corners)
    dy = np.stack([np.zeros_like(w), w * sin, h * cos, w * sin + h * cos], axis=1)  # (N, 4 corners)
    return np.stack([x + dx.min(1), y + dy.min(1), x + dx.max(1), y + dy.max(1)], axis=1)


def xyxy_to_labelstudio_percent(boxes: BoxesLike, width: float, height: float) -> np.ndarray:
    """Absolute xyxy in a `width` x `height` image → Label Studio `(x, y, w, h)` percent, rotation 0.

    (N, 4) → (N, 4). Boxes are not clipped: clip first with `clip_boxes_xyxy` if they may leave the image.
    """
    b = _as_boxes(boxes)
    scale = 100.0 / np.array([width, height, width, height], np.float64)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1) * scale


def scale_boxes_xyxy(boxes: BoxesLike, scale_x: float, scale_y: float | None = None) -> np.ndarray:
    """Absolute xyxy boxes of an image resized by `scale_x` horizontally and `scale_y` (default `scale_x`)
    vertically, e.g. `new_width / old_width`. (N, 4) → (N, 4)."""
    sy = scale_x if scale_y is None else scale_y
    return _as_boxes(boxes) * np.array([scale_x, sy, scale_x, sy], np.float64)


@dataclass(frozen=True, eq=False)
class ClipResult:
    """Boxes clipped to the image and what happened to each one.

    `boxes` (N, 4) xyxy clipped to `[0, width] x [0, height]`, in input order (dropped ones included).
    The masks (N,) bool are disjoint: `outside` lies entirely outside the image; `empty` has zero or negative
    width or height after clipping (or a non-finite coordinate) without being outside; `clipped` was partly
    outside and still has positive size after clipping. `keep` = neither outside nor empty.
    """

    boxes: np.ndarray
    clipped: np.ndarray
    empty: np.ndarray
    outside: np.ndarray

    @property
    def keep(self) -> np.ndarray:
        return ~(self.empty | self.outside)

    @property
    def num_clipped(self) -> int:
        return int(self.clipped.sum())

    @property
    def num_empty(self) -> int:
        return int(self.empty.sum())

    @property
    def num_outside(self) -> int:
        return int(self.outside.sum())


def clip_boxes_xyxy(boxes: BoxesLike, width: float, height: float) -> ClipResult:
    """Clip absolute xyxy boxes (N, 4) to a `width` x `height` image; see `ClipResult` for the masks.

    A box touching the image only along an edge (e.g. `x1 == width`) counts as outside. Boxes with
    `x2 < x1` or `y2 < y1` are not reordered: they count as empty.
    """
    b = _as_boxes(boxes)
    finite = np.isfinite(b).all(axis=1)
    with np.errstate(invalid="ignore"):
        outside = finite & (
            (b[:, 0] >= width) | (b[:, 2] <= 0) | (b[:, 1] >= height) | (b[:, 3] <= 0)
        )
        out = np.clip(b, 0.0, np.array([width, height, width, height], np.float64))
        positive = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    empty = ~outside & ~(finite & positive)
    clipped = ~outside & ~empty & (out != b).any(axis=1)
    return ClipResult(out, clipped, empty, outside)
