"""Detector registry: every detector is built by name with keyword-only arguments, offline.

`num_classes` counts foreground classes only (the dataset's 0-based labels); models reserve label 0 for
background, so engine code adds 1 to dataset labels on the way in and subtracts 1 on the way out.
Pretrained weights are used only when their files are present in `weights_dir` (`magral_core.vision.weights`);
otherwise one log line is written and initialisation is random. No builder can start a download.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from magral_core.vision.detectors import zoo
from magral_core.vision.detectors.light_frcnn import build_frcnn_mobilenet_v2

DEFAULT_DETECTOR = "frcnn_mobilenet_v2"


@dataclass(frozen=True)
class DetectorSpec:
    """How to rebuild a detector: registry name plus its constructor arguments (all JSON-serialisable)."""

    name: str
    num_classes: int
    image_size: int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "image_size": self.image_size}


Builder = Callable[..., nn.Module]

DETECTORS: dict[str, Builder] = {
    "frcnn_mobilenet_v2": zoo.light_frcnn,
    "frcnn_mobilenet_v2_p3": zoo.light_frcnn_p3,
    "ssd300_vgg16": zoo.ssd300_vgg16,
    "retinanet_resnet50_fpn": zoo.retinanet_resnet50_fpn,
    "ssdlite320_mobilenet_v3": zoo.ssdlite320_mobilenet_v3,
}
"""Registered detector builders: `builder(*, num_classes, image_size, weights_dir, pretrained)`."""


def build_detector(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    weights_dir: Path,
    pretrained: bool = True,
    seed: int = 0,
) -> nn.Module:
    """A detector for `num_classes` foreground classes that resizes images to `image_size` (longest side).

    Initialisation is seeded with `seed` without touching the caller's random state. The returned module
    carries `detector_spec` (a `DetectorSpec`) so checkpoints can describe it. Raises ValueError for an
    unknown name or a non-positive class count / size.
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; registered: {sorted(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (foreground classes), found {num_classes}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, found {image_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DETECTORS[name](
            num_classes=num_classes, image_size=image_size, weights_dir=Path(weights_dir),
            pretrained=pretrained,
        )
    model.detector_spec = DetectorSpec(name, num_classes, image_size)  # type: ignore[assignment]
    return model


def detector_spec(model: nn.Module) -> DetectorSpec:
    """The spec `build_detector` attached; raises ValueError for a module not built by it."""
    spec = getattr(model, "detector_spec", None)
    if not isinstance(spec, DetectorSpec):
        raise ValueError(
            "model was not built by magral_core.vision.detectors.build_detector (no detector_spec)"
        )
    return spec


__all__ = ["DEFAULT_DETECTOR", "DETECTORS", "DetectorSpec", "build_detector", "build_frcnn_mobilenet_v2",
           "detector_spec"]
