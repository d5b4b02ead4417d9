"""A CPU-friendly Faster R-CNN on the ImageNet MobileNetV2 backbone.

Layout (strides relative to the network input):

    trunk  = MobileNetV2 features[:trunk_layers]   frozen weights, frozen batch-norm statistics
    tail   = features[trunk_layers:14] -> C4 (96 ch, stride 16)
             features[14:18]           -> C5 (320 ch, stride 32)
             a two-level FPN           -> {"0": P4, "1": P5}, `out_channels` each
    heads  = RPN (anchors 16–384 px) + MultiScaleRoIAlign 7×7 + two-layer MLP box head

With `stride8` (the `frcnn_mobilenet_v2_p3` detector, for small objects) the trunk's own stride-8 output
(32 channels with the default 7 trunk layers) enters the FPN as C3 too: {"0": P3, "1": P4, "2": P5}, with
anchors 12–384 px (SMALL_ANCHOR_SIZES); the heads then see about 5 times the anchor positions.

Every batch-norm layer is a `FrozenBatchNorm2d` holding the ImageNet statistics (folded into the convs in
the trunk), so the trunk is a fixed function of the image: its feature maps can be computed once per
image (and per flipped image) and cached, and `backbone.tail_forward(trunk_maps)` gives exactly what
`backbone(images)` gives.

In eval mode each detection also carries `class_probs`: the full softmax (background in column 0) of the
proposal it came from, for uncertainty-based selection.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.ops.misc import FrozenBatchNorm2d

C4_END = 14  # MobileNetV2 features[:14] ends at stride 16 with 96 channels
C5_END = 18  # features[14:18] ends at stride 32 with 320 channels (the 1280-ch 1×1 conv is not used)
C4_CHANNELS, C5_CHANNELS = 96, 320

ANCHOR_SIZES = ((16, 32, 64), (96, 192, 384))  # pixels at the network input, per FPN level
ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)
# with a stride-8 level: about 1.5-4 cells per anchor side on every level, as the two-level set has on P4
SMALL_ANCHOR_SIZES = ((12, 20, 32), (48, 72, 108), (160, 256, 384))
TRUNK_CHANNELS = {7: 32}  # channels of features[:trunk_layers] where it ends at stride 8


class MobileNetV2Backbone(nn.Module):
    """Frozen trunk + trainable tail producing a two-level feature pyramid."""

    def __init__(self, *, weights: MobileNet_V2_Weights | None, out_channels: int, trunk_layers: int,
                 stride8: bool = False) -> None:
        super().__init__()
        if not 1 <= trunk_layers <= C4_END:
            raise ValueError(f"trunk_layers must be within [1, {C4_END}], found {trunk_layers}")
        if stride8 and trunk_layers not in TRUNK_CHANNELS:
            raise ValueError(f"a stride-8 level needs a trunk ending at stride 8 ({sorted(TRUNK_CHANNELS)} "
                             f"layers), found {trunk_layers}")
        features = mobilenet_v2(weights=weights, norm_layer=FrozenBatchNorm2d).features
        self.trunk = fold_frozen_batch_norm(features[:trunk_layers])
        self.c4 = features[trunk_layers:C4_END]
        self.c5 = features[C4_END:C5_END]
        self.stride8 = stride8
        inputs = [TRUNK_CHANNELS[trunk_layers]] if stride8 else []
        self.fpn = FeaturePyramidNetwork([*inputs, C4_CHANNELS, C5_CHANNELS], out_channels)
        self.out_channels = out_channels
        self.trunk.requires_grad_(False)
        self._given: tuple[Tensor, tuple[int, ...]] | None = None

    def trunk_forward(self, images: Tensor) -> Tensor:
        """Frozen trunk maps of normalised images (B, 3, H, W); no gradient is kept."""
        with torch.no_grad():
            return self.trunk(images)

    def tail_forward(self, trunk_maps: Tensor) -> OrderedDict[str, Tensor]:
        """Pyramid {"0": stride 16, "1": stride 32} (with `stride8`: {"0": 8, "1": 16, "2": 32}), each
        (B, out_channels, h, w), from trunk maps."""
        c4 = self.c4(trunk_maps)  # (B, 96, H/16, W/16)
        c5 = self.c5(c4)  # (B, 320, H/32, W/32)
        levels = [trunk_maps, c4, c5] if self.stride8 else [c4, c5]
        return self.fpn(OrderedDict((str(i), level) for i, level in enumerate(levels)))

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        given = getattr(self, "_given", None)  # absent from models pickled before it existed
        if given is not None and tuple(images.shape) == given[1]:
            return self.tail_forward(given[0])
        return self.tail_forward(self.trunk_forward(images))

    @contextmanager
    def given_trunk(self, maps: Tensor, input_shape: tuple[int, ...]) -> Iterator[None]:
        """Within the block, a forward over a batch of shape `input_shape` (B, 3, H, W) takes `maps` as its
        trunk maps instead of computing them (`vision.trunk_cache`); any other batch is computed."""
        previous, self._given = getattr(self, "_given", None), (maps, tuple(input_shape))
        try:
            yield
        finally:
            self._given = previous


def fold_frozen_batch_norm(module: nn.Module) -> nn.Module:
    """Fold every `FrozenBatchNorm2d` that directly follows a `Conv2d` in a Sequential into that conv's
    weights and bias (the pair computes the same function, with one pass over the feature map instead of
    three); returns `module`, changed in place. Only for layers that are not trained: a folded conv learns
    with a different per-channel scale than the pair would."""
    for child in list(module.modules()):
        if not isinstance(child, nn.Sequential):
            continue
        for i in range(len(child) - 1):
            conv, norm = child[i], child[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, FrozenBatchNorm2d):
                weight, bias = fuse_conv_bn_weights(
                    conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight,
                    norm.bias,
                )
                fused = copy.deepcopy(conv)
                fused.weight, fused.bias = weight, bias
                child[i], child[i + 1] = fused, nn.Identity()
    return module


class ProbRoIHeads(RoIHeads):
    """Box heads whose eval-mode detections also carry the softmax over all classes (`class_probs`)."""

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            return super().forward(features, proposals, image_shapes, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        return self.detections_with_probs(class_logits, box_regression, proposals, image_shapes), {}

    def detections_with_probs(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """torchvision's post-processing (per-class boxes, score threshold, per-class NMS, top-k), keeping
        for each detection the softmax row of the proposal it came from."""
        num_classes = class_logits.shape[-1]
        pred_boxes = self.box_coder.decode(box_regression, proposals)  # (R, C+1, 4)
        pred_scores = F.softmax(class_logits, -1)  # (R, C+1)
        counts = [len(p) for p in proposals]
        results = []
        for boxes, probs, shape in zip(
            pred_boxes.split(counts), pred_scores.split(counts), image_shapes, strict=True
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)  # (R*C, 4)
            scores = probs[:, 1:].reshape(-1)  # (R*C,)
            labels = torch.arange(1, num_classes).repeat(len(probs))  # (R*C,)
            rows = torch.arange(len(probs)).repeat_interleave(num_classes - 1)  # proposal of each entry
            keep = torch.where(scores > self.score_thresh)[0]
            keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
            keep = keep[box_ops.batched_nms(boxes[keep], scores[keep], labels[keep], self.nms_thresh)]
            keep = keep[: self.detections_per_img]
            results.append(
                {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                 "class_probs": probs[rows[keep]]}
            )
        return results


def build_frcnn_mobilenet_v2(
    *,
    num_classes: int,
    image_size: int,
    weights: MobileNet_V2_Weights | None,
    out_channels: int = 128,
    trunk_layers: int = 7,
    representation_size: int = 512,
    stride8: bool = False,
) -> FasterRCNN:
    """The light Faster R-CNN for `num_classes` foreground classes (the model adds background as label 0).

    Images are resized so that their longest side is `image_size` pixels. `trunk_layers` MobileNetV2 blocks
    are frozen (7 = up to stride 8, 32 channels); `stride8` adds their output as a stride-8 pyramid level.
    """
    backbone = MobileNetV2Backbone(weights=weights, out_channels=out_channels, trunk_layers=trunk_layers,
                                   stride8=stride8)
    sizes = SMALL_ANCHOR_SIZES if stride8 else ANCHOR_SIZES
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    roi_pool = MultiScaleRoIAlign(featmap_names=[str(i) for i in range(len(sizes))], output_size=7,
                                  sampling_ratio=1)
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=image_size,
        max_size=image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=300,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(out_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
    )
    # The same settings FasterRCNN gave its own RoIHeads, except fewer sampled RoIs per image (cheaper head).
    model.roi_heads = ProbRoIHeads(
        roi_pool,
        model.roi_heads.box_head,
        model.roi_heads.box_predictor,
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=128,
        positive_fraction=0.25,
        bbox_reg_weights=None,
        score_thresh=0.01,
        nms_thresh=0.5,
        detections_per_img=100,
    )
    return model
