"""Detection-head training on cached frozen features: what the pseudo-label and retrospective rewards train.

[ours] The paper's proxy trains only the box predictor. Here the trainable part is the box head's last layer
and the predictor (`Tail`: fc7 → ReLU → predictor of the light Faster R-CNN's `TwoMLPHead`), so the cached
representation of a proposal is the box head's fc6 output (`TailFeatures`, a `proxy.FrozenFeatures` whose
representation stops one layer earlier); a box head without fc6/fc7 falls back to training the predictor on
the full box-head output. Training is supervised (Faster R-CNN box-head loss) on labeled images plus, one per
step, images of an extra set (a candidate batch with pseudo or true labels): the labeled order and the extra
draws come from separate streams of one seed, so every record of one seed sees the same labeled order
(common random numbers) and two records differ only by their extra images.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magral_core.method.proxy import FrozenFeatures, _Targets, head_detections


@dataclass(frozen=True)
class HeadSettings:
    """Schedule of one head training (one reward record)."""

    epochs: int = 10
    """Passes over the labeled images, one labeled (and one extra, when there are extra) image per step."""
    learning_rate: float = 0.005
    """SGD learning rate (momentum 0.9)."""
    extra_weight: float = 1.0
    """Weight of the extra image's loss against the labeled image's."""
    reinit: bool = False
    """Start the tail from a fresh (seeded) initialisation instead of the task detector's weights."""
    score_threshold: float = 0.05
    """Detections below it are dropped before evaluation."""


def _has_mlp(model: Any) -> bool:
    head = model.roi_heads.box_head
    return hasattr(head, "fc6") and hasattr(head, "fc7")


class TailFeatures(FrozenFeatures):
    """`FrozenFeatures` whose proposal representation is the box head's ReLU(fc6) output (the tail's
    input)."""

    def _reps(self, maps: dict[str, Tensor], boxes: Tensor, size: tuple[int, int]) -> Tensor:
        heads = self.model.roi_heads
        pooled = heads.box_roi_pool(maps, [boxes], [size])  # (K, C, 7, 7)
        if not _has_mlp(self.model):
            return heads.box_head(pooled)
        return F.relu(heads.box_head.fc6(pooled.flatten(1)))  # (K, D)


class Tail(nn.Module):
    """fc7 → ReLU → box predictor; `forward(reps) -> (class logits (K, C+1), box deltas (K, (C+1)·4))`."""

    def __init__(self, fc7: nn.Module | None, predictor: nn.Module) -> None:
        super().__init__()
        self.fc7 = fc7
        self.predictor = predictor

    def forward(self, reps: Tensor) -> tuple[Tensor, Tensor]:
        x = reps if self.fc7 is None else F.relu(self.fc7(reps))
        logits, deltas = self.predictor(x)
        return logits, deltas


def make_tail(model: Any, *, reinit: bool, seed: int) -> Tail:
    """A trainable copy of `model`'s tail; `reinit` re-draws its weights (seeded) as torch initialises
    them."""
    heads = model.roi_heads
    fc7 = copy.deepcopy(heads.box_head.fc7) if _has_mlp(model) else None
    tail = Tail(fc7, copy.deepcopy(heads.box_predictor))
    if reinit:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in tail.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
    return tail


def train_tail(model: Any, labeled: Sequence[_Targets], extra: Sequence[_Targets], settings: HeadSettings,
               *, seed: int) -> Tail:
    """A tail (see `make_tail`) trained on the box-head loss of `labeled` + `extra_weight` × that of one
    `extra` image per step (see module doc)."""
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    heads = model.roi_heads
    tail = make_tail(model, reinit=settings.reinit, seed=seed).train()
    params = list(tail.parameters())
    optimiser = torch.optim.SGD(params, lr=settings.learning_rate, momentum=0.9, weight_decay=1e-4)
    rng, extra_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])

    def loss_of(t: _Targets) -> Tensor:
        positive, negative = heads.fg_bg_sampler([t.labels])
        idx = torch.where(positive[0] | negative[0])[0]
        logits, deltas = tail(t.reps[idx])
        cls_loss, box_loss = fastrcnn_loss(logits, deltas, [t.labels[idx]], [t.regression[idx]])
        return cls_loss + box_loss

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the RoI sampler draws from the global generator
        for _ in range(settings.epochs):
            for k in rng.permutation(len(labeled)):
                loss = loss_of(labeled[int(k)])
                if len(extra):
                    loss = loss + settings.extra_weight * loss_of(extra[int(extra_rng.integers(len(extra)))])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                optimiser.step()
    return tail.eval()


def tail_map(tail: Tail, val: TailFeatures, score_threshold: float) -> float:
    """COCO mAP@[.5:.95] of `tail` on every image of `val` (0 when undefined)."""
    from magral_core.vision.evaluation import evaluate_coco

    detections = head_detections(val, tail, range(len(val.dataset)), score_threshold)
    value = evaluate_coco(val.dataset, detections).map
    return 0.0 if np.isnan(value) else float(value)
