"""Seeded training augmentation for small labeled sets: zoom (crop in or pad out, boxes kept or dropped) and
colour jitter, on one image and its boxes at a time.

Images are float (3, h, w) tensors in [0, 1]; boxes are (N, 4) xyxy pixels of that image with (N,) labels.
The detector's own transform resizes every image back to its longest side, so a zoom changes the object
scale the network sees (multi-scale training) without changing the cost of a step. Every random draw comes
from the `numpy.random.Generator` passed in: the same generator state gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

PAD_VALUE = 0.5  # grey canvas around a zoomed-out image: neutral after the detector's normalisation


@dataclass(frozen=True)
class Augmentation:
    """`zoom_range` (min, max): the zoom factor is drawn log-uniformly from it (> 1 crops in, < 1 pads out;
    (1, 1) = off); `min_visible`: a box cut by a crop is kept (clipped) when at least this share of its area
    stays inside, else dropped; `colour`: brightness, contrast and saturation factors are drawn from
    [1 - colour, 1 + colour] (0 = off)."""

    zoom_range: tuple[float, float] = (1.0, 1.0)
    min_visible: float = 0.5
    colour: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.zoom_range
        if not 0 < low <= high:
            raise ValueError(f"zoom_range must satisfy 0 < min <= max, found {self.zoom_range}")
        if not 0 < self.min_visible <= 1 or not 0 <= self.colour < 1:
            raise ValueError(f"min_visible must be in (0, 1] and colour in [0, 1), found {self.min_visible}, "
                             f"{self.colour}")

    @property
    def enabled(self) -> bool:
        return self.zoom_range != (1.0, 1.0) or self.colour > 0

    def __call__(self, image: Tensor, boxes: Tensor, labels: Tensor, rng: np.random.Generator
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """The augmented (image, boxes, labels); draws from `rng` in a fixed order whatever is enabled."""
        low, high = self.zoom_range
        factor = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        position = rng.random(2)
        jitter = rng.uniform(1 - self.colour, 1 + self.colour, size=3)
        if factor > 1.0:
            image, boxes, labels = crop(image, boxes, labels, factor, position, self.min_visible)
        elif factor < 1.0:
            image, boxes = pad(image, boxes, factor, position)
        if self.colour > 0:
            image = colour_jitter(image, *(float(j) for j in jitter))
        return image, boxes, labels


def crop(image: Tensor, boxes: Tensor, labels: Tensor, factor: float, position: np.ndarray,
         min_visible: float) -> tuple[Tensor, Tensor, Tensor]:
    """The window of 1/`factor` of each side at relative `position` (x, y in [0, 1]), with the boxes moved
    into it: each clipped to the window and kept when at least `min_visible` of its area (and a positive
    width and height) stays inside, else dropped with its label."""
    _, height, width = image.shape
    crop_h, crop_w = max(1, round(height / factor)), max(1, round(width / factor))
    top = round(float(position[1]) * (height - crop_h))
    left = round(float(position[0]) * (width - crop_w))
    out = image[:, top:top + crop_h, left:left + crop_w]
    shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    clipped = torch.stack([shifted[:, 0].clamp(0, crop_w), shifted[:, 1].clamp(0, crop_h),
                           shifted[:, 2].clamp(0, crop_w), shifted[:, 3].clamp(0, crop_h)], dim=1)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    kept_w, kept_h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (kept_w >= 1) & (kept_h >= 1) & (kept_w * kept_h >= min_visible * area)
    return out, clipped[keep], labels[keep]


def pad(image: Tensor, boxes: Tensor, factor: float, position: np.ndarray) -> tuple[Tensor, Tensor]:
    """The image placed at relative `position` on a grey canvas 1/`factor` times its size (factor < 1)."""
    channels, height, width = image.shape
    canvas_h, canvas_w = round(height / factor), round(width / factor)
    top = round(float(position[1]) * (canvas_h - height))
    left = round(float(position[0]) * (canvas_w - width))
    canvas = torch.full((channels, canvas_h, canvas_w), PAD_VALUE, dtype=image.dtype)
    canvas[:, top:top + height, left:left + width] = image
    return canvas, boxes + torch.tensor([left, top, left, top], dtype=boxes.dtype)


def colour_jitter(image: Tensor, brightness: float, contrast: float, saturation: float) -> Tensor:
    """Scale brightness, then contrast about the mean grey, then saturation about each pixel's grey;
    clamped to [0, 1]."""
    out = image * brightness
    grey = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])  # (h, w)
    out = (out - grey.mean()) * contrast + grey.mean()
    grey = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])
    out = (out - grey) * saturation + grey
    return out.clamp_(0.0, 1.0)
