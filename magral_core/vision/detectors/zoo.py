"""Builders of the registered detectors, each `builder(*, num_classes, image_size, weights_dir, pretrained)`.

Every torchvision builder gets `weights=None` (detection weights are for COCO's 91 classes) and an explicit
`weights_backbone`: the ImageNet backbone when its file is in `weights_dir`, else None. torchvision loads a
present file through `torch.hub`, so the hub directory is pointed at `weights_dir` while the model is built;
the file is known to be there, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torchvision.models import (
    MobileNet_V2_Weights,
    MobileNet_V3_Large_Weights,
    ResNet50_Weights,
    VGG16_Weights,
    WeightsEnum,
)
from torchvision.models.detection import retinanet_resnet50_fpn as tv_retinanet
from torchvision.models.detection import ssd300_vgg16 as tv_ssd300
from torchvision.models.detection import ssdlite320_mobilenet_v3_large as tv_ssdlite

from magral_core.vision.detectors.light_frcnn import build_frcnn_mobilenet_v2
from magral_core.vision.weights import resolve


@contextmanager
def hub_dir(weights_dir: Path) -> Iterator[None]:
    """torch.hub reads checkpoints from `<hub dir>/checkpoints`; point it at `weights_dir` for a while."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(Path(weights_dir).parent))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def _weights(enum: WeightsEnum, weights_dir: Path, what: str, pretrained: bool) -> WeightsEnum | None:
    return resolve(enum, weights_dir, what) if pretrained else None


def light_frcnn(*, num_classes: int, image_size: int, weights_dir: Path, pretrained: bool) -> nn.Module:
    """Light Faster R-CNN, MobileNetV2 ImageNet backbone (see `light_frcnn`)."""
    weights = _weights(MobileNet_V2_Weights.IMAGENET1K_V1, weights_dir, "MobileNetV2 ImageNet", pretrained)
    with hub_dir(weights_dir):
        return build_frcnn_mobilenet_v2(num_classes=num_classes, image_size=image_size, weights=weights)


def light_frcnn_p3(*, num_classes: int, image_size: int, weights_dir: Path, pretrained: bool) -> nn.Module:
    """The light Faster R-CNN with a stride-8 level and smaller anchors, for small objects."""
    weights = _weights(MobileNet_V2_Weights.IMAGENET1K_V1, weights_dir, "MobileNetV2 ImageNet", pretrained)
    with hub_dir(weights_dir):
        return build_frcnn_mobilenet_v2(num_classes=num_classes, image_size=image_size, weights=weights,
                                        stride8=True)


def ssd300_vgg16(*, num_classes: int, image_size: int, weights_dir: Path, pretrained: bool) -> nn.Module:
    """The paper's SSD300 on VGG16 (input fixed at 300×300 by its own transform; `image_size` is unused)."""
    backbone = _weights(VGG16_Weights.IMAGENET1K_FEATURES, weights_dir, "VGG16 ImageNet", pretrained)
    with hub_dir(weights_dir):
        return tv_ssd300(weights=None, weights_backbone=backbone, num_classes=num_classes + 1)


def retinanet_resnet50_fpn(
    *, num_classes: int, image_size: int, weights_dir: Path, pretrained: bool
) -> nn.Module:
    """The paper's COCO detector: RetinaNet, ResNet-50 FPN, images resized to `image_size` longest side."""
    backbone = _weights(ResNet50_Weights.IMAGENET1K_V1, weights_dir, "ResNet-50 ImageNet", pretrained)
    with hub_dir(weights_dir):
        return tv_retinanet(
            weights=None, weights_backbone=backbone, num_classes=num_classes + 1,
            min_size=image_size, max_size=image_size,
        )


def ssdlite320_mobilenet_v3(
    *, num_classes: int, image_size: int, weights_dir: Path, pretrained: bool
) -> nn.Module:
    """SSDlite on MobileNetV3-Large (input fixed at 320×320 by its own transform; `image_size` is unused)."""
    backbone = _weights(MobileNet_V3_Large_Weights.IMAGENET1K_V1, weights_dir, "MobileNetV3 ImageNet",
                        pretrained)
    with hub_dir(weights_dir):
        return tv_ssdlite(weights=None, weights_backbone=backbone, num_classes=num_classes + 1)
