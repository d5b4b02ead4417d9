"""Frozen trunk maps computed once per image and reused by every later pass over it.

A detector whose backbone has a frozen trunk (`detectors.light_frcnn`: frozen weights, frozen batch-norm
folded into the convs) computes the same trunk maps for an image every time it sees it: in every epoch of
a training, and in every round and strategy of a simulated curve, since every detector is built from the
same ImageNet trunk. `TrunkCache` keeps those maps per (image file, flip, input size), computed on the
image alone through the model's own transform, and hands a batch's maps to the backbone
(`MobileNetV2Backbone.given_trunk`), so torchvision's forward runs unchanged on them. The maps equal the
batched computation's up to float rounding (a convolution's summation order may depend on the batch
size); a batch whose padded input differs from its images' own (images of different sizes) is computed
as before.

The cache belongs to one trunk: it keeps a signature of the trunk's weights and starts over when a model
with another trunk comes. It stops adding maps beyond `max_bytes` (the rest is computed each time).
Training reads it only without augmentation (zoom and colour jitter change the trunk's input).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch
from torch import Tensor, nn


class TrunkCache:
    """Trunk maps by key, for one trunk; at most `max_bytes` of them (0: none kept)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, found {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._signature: tuple[float, ...] | None = None
        self._maps: dict[Hashable, tuple[Tensor, tuple[int, ...]]] = {}

    def __len__(self) -> int:
        return len(self._maps)

    def __getstate__(self) -> dict[str, Any]:  # a pickled copy (a spawned worker's learner) starts empty
        state = dict(self.__dict__)
        state.update(_maps={}, bytes=0, hits=0, misses=0, _signature=None)
        return state

    def context(self, model: nn.Module, keys: Sequence[Hashable], images: Sequence[Tensor]
                ) -> AbstractContextManager[object]:
        """A context in which `model(images, ...)` reads the batch's trunk maps from the cache (computing and
        storing the missing ones); a no-op context when the model has no separable trunk, or the batch's
        padded input is not its images' own. `images` are the float tensors the model is called with;
        `keys[i]` names images[i] (file, flip, input size)."""
        backbone: Any = model.get_submodule("backbone")
        if not hasattr(backbone, "given_trunk") or len(keys) != len(images) or not images:
            return nullcontext()
        self._check_trunk(backbone)
        maps, shapes = [], set()
        for key, image in zip(keys, images, strict=True):
            found = self._maps.get(key)
            if found is None:
                self.misses += 1
                found = self._compute(model, backbone, image)
                size = found[0].element_size() * found[0].nelement()
                if self.bytes + size <= self.max_bytes:
                    self._maps[key] = found
                    self.bytes += size
            else:
                self.hits += 1
            maps.append(found[0])
            shapes.add(found[1])
        if len(shapes) != 1:
            return nullcontext()
        return cast(AbstractContextManager[object],
                    backbone.given_trunk(torch.stack(maps), (len(maps), *shapes.pop())))

    @staticmethod
    def _compute(model: nn.Module, backbone: Any, image: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """(trunk maps, padded input shape (3, H, W)) of one image through the model's transform."""
        transform = model.get_submodule("transform")
        with torch.no_grad():
            batch, _ = transform([image])
            maps = backbone.trunk_forward(batch.tensors)
        return maps[0], tuple(batch.tensors.shape[1:])

    def _check_trunk(self, backbone: Any) -> None:
        """Start over when the model's trunk is not the one the stored maps came from."""
        params = [p.detach() for p in backbone.trunk.parameters()]
        signature = (float(len(params)), *(float(p.double().abs().sum()) for p in params[:2]),
                     float(params[-1].double().sum()) if params else 0.0)
        if signature != self._signature:
            self._maps.clear()
            self.bytes = 0
            self._signature = signature
