"""The semi-supervised proxy detector that turns a candidate batch into a look-up-table record (an mAP).

CPU-feasible form of the paper's proxy: the round's task detector is frozen up to its RoI representation
(backbone, FPN, RPN and the RoI MLP), so every image's proposals and their representations are computed
once, for the image and (mirrored proposals) for its horizontal flip, and cached (`FrozenFeatures`). A
record trains only a copy of the final classifier/regressor (`box_predictor`, starting from the task
detector's weights) for a short schedule on

    L_S + w(t) · L_U

where L_S is the Faster R-CNN box-head loss on the labeled training part, and L_U a CSD-style flip
consistency on the candidate batch (unlabeled): the same proposals are classified in the image and,
mirrored, in the flipped image; L_U is the symmetric KL between the two class distributions plus the squared
difference of the box offsets (the x offset negated for the flip), averaged over proposals whose best
foreground probability beats the background. w(t) = w_max · exp(−5 (1 − t)²) ramps up over the first
`rampup` of the steps (t = step / (rampup · steps), capped at 1).
The record's value is COCO mAP@[.5:.95] on a validation part carved (seeded) from the labeled set: the test
split is never touched. Works with detectors that have `rpn` and `roi_heads` (the Faster R-CNN family).

Kept as one module because the frozen features, the head training and the cached proxy are one method whose
parts share private records.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magral_core.atomic import atomic_open
from magral_core.structures import DetectionDataset, Detections

CACHE_FORMAT = 1
"""Version of the file `CachedProxy.save` writes; `CachedProxy.load` refuses any other."""


@dataclass(frozen=True)
class ProxySettings:
    """Schedule of one proxy training (one look-up-table record)."""

    epochs: int = 10
    """Passes over the labeled training part, one labeled and one unlabeled image per step."""
    learning_rate: float = 0.005
    """SGD learning rate (momentum 0.9) of the box head."""
    consistency_weight: float = 1.0
    """w_max, the weight of L_U once ramped up."""
    rampup: float = 0.5
    """Fraction of the steps over which w(t) ramps up."""
    val_fraction: float = 0.25
    """Share of the labeled images carved off as the validation part (at least one image)."""
    unlabeled_rois: int = 64
    """Top proposals per unlabeled image used by the consistency loss."""
    score_threshold: float = 0.05
    """Detections below it are dropped before evaluation."""


@dataclass
class _Frozen:
    """One image's frozen outputs in network-input pixels: proposals and their box-head representations in
    the image and (mirrored proposals) in its flip, plus sizes."""

    proposals: Tensor  # (P, 4)
    reps: Tensor  # (P, D) box-head output for the proposals
    reps_flip: Tensor  # (P, D) box-head output for the mirrored proposals in the flipped image
    size: tuple[int, int]  # network-input (h, w)
    scale: float  # network-input pixels per original pixel

    def to(self, device: torch.device) -> _Frozen:
        return _Frozen(self.proposals.to(device), self.reps.to(device), self.reps_flip.to(device), self.size,
                       self.scale)


@dataclass
class _Targets:
    """Training targets of one labeled image over its proposals + ground-truth boxes."""

    reps: Tensor  # (P + G, D)
    labels: Tensor  # (P + G,) 0 = background
    regression: Tensor  # (P + G, 4) encoded offsets to the matched ground truth

    def to(self, device: torch.device) -> _Targets:
        return _Targets(self.reps.to(device), self.labels.to(device), self.regression.to(device))


class FrozenFeatures:
    """Lazily computed, cached frozen outputs of `model` for the images of `dataset` (by position).

    Frozen: backbone, FPN, RPN and the RoI MLP (`box_head`); only `box_predictor` is trained by the proxy.
    `max_rois` keeps only an image's top proposals (the RPN returns them best first): enough for images the
    proxy only sees unlabeled, whose consistency loss reads no more than `ProxySettings.unlabeled_rois`.
    Computed on the device of `model`'s parameters and handed out there; kept (and saved) on the CPU, so a
    cache is the same file whichever device made it and device memory holds only what a step uses.
    """

    def __init__(self, model: nn.Module, dataset: DetectionDataset, max_rois: int | None = None) -> None:
        if not (hasattr(model, "rpn") and hasattr(model, "roi_heads") and hasattr(model, "transform")):
            raise ValueError("the proxy needs a two-stage detector with rpn and roi_heads (Faster R-CNN)")
        from magral_core.vision.detectors import detector_spec
        from magral_core.vision.engine import DecodedImageCache

        self.model: Any = model.eval()
        self.device = next(model.parameters()).device
        self.dataset = dataset
        self.images = DecodedImageCache(dataset, detector_spec(model).image_size)
        self.max_rois = max_rois
        self._cache: dict[int, _Frozen] = {}
        self._targets: dict[int, _Targets] = {}

    def _reps(self, maps: dict[str, Tensor], boxes: Tensor, size: tuple[int, int]) -> Tensor:
        heads = self.model.roi_heads
        return heads.box_head(heads.box_roi_pool(maps, [boxes], [size]))  # (K, D)

    @torch.no_grad()
    def __getitem__(self, index: int) -> _Frozen:
        if index not in self._cache:
            self._compute(index)
        return self._cache[index].to(self.device)

    def _compute(self, index: int) -> dict[str, Tensor]:
        """Cache image `index` (one backbone pass over it and its flip); returns the image's own maps."""
        pixels = self.images[index].pixels.to(self.device).float().div(255.0)  # (3, h, w)
        batch, _ = self.model.transform([pixels, pixels.flip(-1)])
        maps = self.model.backbone(batch.tensors)  # {"0": (2, C, h/16, w/16), ...}
        if isinstance(maps, Tensor):
            maps = {"0": maps}
        first = {k: v[:1] for k, v in maps.items()}
        second = {k: v[1:] for k, v in maps.items()}
        one = type(batch)(batch.tensors[:1], batch.image_sizes[:1])
        proposals = self.model.rpn(one, first)[0][0][: self.max_rois]  # (P, 4), best first
        h, w = batch.image_sizes[0]
        self._cache[index] = _Frozen(
            proposals.cpu(), self._reps(first, proposals, (h, w)).cpu(),
            self._reps(second, flip_boxes(proposals, w), (h, w)).cpu(), (h, w),
            w / self.dataset.images[index].width,
        )
        return first

    @torch.no_grad()
    def targets(self, index: int) -> _Targets:
        """Representations, class labels (+1; 0 = background) and regression targets of a labeled image's
        proposals and ground-truth boxes (crowd boxes dropped), matched as the detector's RoI heads do."""
        if index not in self._targets:
            # the ground-truth boxes need the image's maps: reuse the caching pass when it happens here
            maps = self._compute(index) if index not in self._cache else None
            f = self._cache[index].to(self.device)
            image = self.dataset.images[index]
            keep = ~image.iscrowd
            gt = torch.as_tensor(image.boxes_xyxy[keep], dtype=torch.float32, device=self.device)
            gt = gt.reshape(-1, 4) * f.scale  # (G, 4)
            gt_labels = torch.as_tensor(image.labels[keep], dtype=torch.int64, device=self.device) + 1
            heads = self.model.roi_heads
            boxes = torch.cat([f.proposals, gt])  # (P + G, 4)
            reps = f.reps
            if len(gt):
                maps = maps if maps is not None else self._maps(index)
                reps = torch.cat([f.reps, self._reps(maps, gt, f.size)])  # (P + G, D)
            matched, labels = heads.assign_targets_to_proposals([boxes], [gt], [gt_labels])
            matched_gt = gt[matched[0]] if len(gt) else torch.zeros_like(boxes)
            regression = heads.box_coder.encode([matched_gt], [boxes])[0]
            self._targets[index] = _Targets(reps, labels[0], regression).to(torch.device("cpu"))
        return self._targets[index].to(self.device)

    def state(self) -> dict[str, Any]:
        """What has been computed so far as plain tensors, numbers and dicts (loadable with
        `torch.load(..., weights_only=True)`), keyed by image position, with the dataset's image ids."""
        return {
            "image_ids": [image.image_id for image in self.dataset.images],
            "frozen": {
                i: {"proposals": f.proposals.clone(), "reps": f.reps.clone(),
                    "reps_flip": f.reps_flip.clone(), "size": [int(f.size[0]), int(f.size[1])],
                    "scale": float(f.scale)}
                for i, f in self._cache.items()
            },
            "targets": {
                i: {"reps": t.reps.clone(), "labels": t.labels.clone(), "regression": t.regression.clone()}
                for i, t in self._targets.items()
            },
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Adopt a `state()` of the same images (replacing what is cached). Raises ValueError when its image
        ids differ from this dataset's."""
        ids = [image.image_id for image in self.dataset.images]
        if list(state["image_ids"]) != ids:
            raise ValueError(
                f"frozen-feature cache of {len(state['image_ids'])} images does not match the dataset's "
                f"{len(ids)} images (image ids differ)"
            )
        self._cache = {
            int(i): _Frozen(f["proposals"], f["reps"], f["reps_flip"], (int(f["size"][0]), int(f["size"][1])),
                            float(f["scale"]))
            for i, f in state["frozen"].items()
        }
        self._targets = {int(i): _Targets(t["reps"], t["labels"], t["regression"])
                         for i, t in state["targets"].items()}

    def _maps(self, index: int) -> dict[str, Tensor]:
        pixels = self.images[index].pixels.to(self.device).float().div(255.0)
        batch, _ = self.model.transform([pixels])
        maps = self.model.backbone(batch.tensors)
        return {"0": maps} if isinstance(maps, Tensor) else dict(maps)


def ramp(t: float) -> float:
    """exp(−5 (1 − t)²) for t in [0, 1], 1 beyond: the usual sigmoid-shaped ramp-up."""
    t = min(max(t, 0.0), 1.0)
    return float(np.exp(-5.0 * (1.0 - t) ** 2))


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror xyxy boxes (K, 4) in an image `width` pixels wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def consistency_mask(logits: Tensor, logits_flip: Tensor) -> Tensor:
    """(K,) bool: proposals whose best foreground probability, in either view, beats the background (the
    proposals the consistency loss counts). `logits` (K, C+1), background in column 0."""
    p, q = F.softmax(logits, -1), F.softmax(logits_flip, -1)
    return torch.maximum(p[:, 1:].max(-1).values, q[:, 1:].max(-1).values) > torch.minimum(p[:, 0], q[:, 0])


def flip_consistency(logits: Tensor, logits_flip: Tensor, deltas: Tensor, deltas_flip: Tensor) -> Tensor:
    """CSD consistency of K proposals seen in an image and (mirrored) in its flip.

    `logits` (K, C+1) with background in column 0; `deltas` (K, (C+1)·4) box offsets (dx, dy, dw, dh) per
    class. Returns the mean over proposals whose best foreground probability (in either view) beats the
    background of symmetric KL(p ‖ p_flip) + KL(p_flip ‖ p) plus Σ over classes and offsets of the squared
    difference, with dx of the flip negated; 0 when no proposal qualifies.
    """
    logp, logq = F.log_softmax(logits, -1), F.log_softmax(logits_flip, -1)
    p, q = logp.exp(), logq.exp()
    mask = consistency_mask(logits, logits_flip)
    kl = (p * (logp - logq)).sum(-1) + (q * (logq - logp)).sum(-1)  # (K,)
    a = deltas.reshape(len(deltas), -1, 4)
    b = deltas_flip.reshape(len(deltas), -1, 4) * torch.tensor([-1.0, 1.0, 1.0, 1.0], device=deltas.device)
    loc = ((a - b) ** 2).sum((1, 2))  # (K,)
    if not mask.any():
        return logits.sum() * 0.0
    return (kl + loc)[mask].mean()


def train_head(
    labeled: FrozenFeatures,
    train: Sequence[int],
    pool: FrozenFeatures,
    unlabeled: Sequence[int],
    settings: ProxySettings,
    *,
    seed: int,
) -> nn.Module:
    """A copy of the detector's `box_predictor` trained on L_S over `labeled[train]` + w(t)·L_U over
    `pool[unlabeled]` (see module doc); one labeled and one unlabeled image per step."""
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    heads = labeled.model.roi_heads
    predictor: Any = copy.deepcopy(heads.box_predictor).train()
    params = list(predictor.parameters())
    optimiser = torch.optim.SGD(params, lr=settings.learning_rate, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    # unlabeled draws from their own stream: the labeled order is then the same for every batch (and for
    # none), so two records of one seed differ only by what their batches contain
    unlabeled_rng = np.random.default_rng([seed, 1])
    ramp_steps = max(1.0, settings.rampup * settings.epochs * max(1, len(train)))
    step = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the RoI sampler draws from the global generator
        for _ in range(settings.epochs):
            for k in rng.permutation(len(train)):
                t = labeled.targets(int(train[int(k)]))
                positive, negative = heads.fg_bg_sampler([t.labels])
                idx = torch.where(positive[0] | negative[0])[0]
                logits, deltas = predictor(t.reps[idx])
                cls_loss, box_loss = fastrcnn_loss(logits, deltas, [t.labels[idx]], [t.regression[idx]])
                loss = cls_loss + box_loss
                if len(unlabeled):
                    u = pool[int(unlabeled[int(unlabeled_rng.integers(len(unlabeled)))])]
                    a = predictor(u.reps[: settings.unlabeled_rois])
                    b = predictor(u.reps_flip[: settings.unlabeled_rois])
                    weight = settings.consistency_weight * ramp(step / ramp_steps)
                    loss = loss + weight * flip_consistency(a[0], b[0], a[1], b[1])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                optimiser.step()
                step += 1
    return predictor.eval()


@torch.no_grad()
def head_detections(frozen: FrozenFeatures, predictor: Any, indices: Sequence[int],
                    score_threshold: float) -> list[Detections]:
    """Detections of a trained predictor on cached images, in original pixels with 0-based labels."""
    heads = frozen.model.roi_heads
    out = []
    for i in indices:
        f = frozen[int(i)]
        logits, deltas = predictor(f.reps)
        boxes, scores, labels = heads.postprocess_detections(logits, deltas, [f.proposals], [f.size])
        keep = scores[0] >= score_threshold
        out.append(Detections(
            (boxes[0][keep] / f.scale).cpu().numpy().astype(np.float32),
            scores[0][keep].cpu().numpy().astype(np.float32),
            (labels[0][keep] - 1).cpu().numpy().astype(np.int64),
        ))
    return out


def carve_validation(labeled: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) split of the labeled positions: `fraction` of them (at least 1) to validation; with a
    single labeled image it serves as both."""
    labeled = np.asarray(labeled, dtype=np.int64)
    if len(labeled) < 2:
        return labeled, labeled
    n_val = min(len(labeled) - 1, max(1, round(fraction * len(labeled))))
    order = np.random.default_rng(seed).permutation(labeled)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def split_validation(labeled: np.ndarray, seed: int, fraction: float = ProxySettings.val_fraction
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions of a round's labeled set: the one split the simulator, the benchmarks and the
    proxy share. The task detector is trained on `train` only and the proxy measures on `val`, so the
    proxy's frozen parts were never fit to its validation images (the service holds its validation tasks
    out of training the same way, `service.tasks`). `carve_validation` with the proxy's default share."""
    return carve_validation(labeled, fraction, seed)


ProxyFn = Callable[[np.ndarray, int], float]


class CachedProxy:
    """`proxy(batch, seed) -> mAP` for one round: the head trained on `train` (labeled) plus `pool` images
    at positions `batch` (unlabeled), evaluated on `val`. `model` is the round's trained task detector.

    Frozen outputs are computed on first use and shared by all calls; `warm` computes them up front (the
    round's one-off caching, so record times can be measured without it); `save`/`load` share them with
    other processes.
    """

    def __init__(self, model: nn.Module, train: DetectionDataset, pool: DetectionDataset,
                 val: DetectionDataset, settings: ProxySettings = ProxySettings()) -> None:
        self.train, self.val = FrozenFeatures(model, train), FrozenFeatures(model, val)
        self.pool = FrozenFeatures(model, pool, max_rois=settings.unlabeled_rois)
        self.settings = settings

    def warm(self, pool_indices: Iterable[int] = ()) -> None:
        """Cache every labeled training image (with its targets), every validation image and the pool
        images at `pool_indices`."""
        for i in range(len(self.train.dataset)):
            self.train.targets(i)
        for i in range(len(self.val.dataset)):
            self.val[i]
        for i in pool_indices:
            self.pool[int(i)]

    def save(self, path: Path) -> None:
        """Write the frozen outputs computed so far (see `warm`) to `path` atomically (a temporary file in
        the same directory, then `os.replace`): concurrent writers and readers only ever see a whole file."""
        state = {"format": CACHE_FORMAT, "train": self.train.state(), "pool": self.pool.state(),
                 "val": self.val.state()}
        with atomic_open(path, "wb") as handle:
            torch.save(state, handle)

    def load(self, path: Path) -> None:
        """Adopt the frozen outputs `save` wrote for the same model and images (nothing is recomputed for
        them). Raises ValueError for another format or other images; OSError/pickle errors for an unreadable
        file."""
        # memory-mapped: a record job touches the pages of its own batch's images only
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: expected a proxy cache of format {CACHE_FORMAT}")
        for name in ("train", "pool", "val"):
            getattr(self, name).load_state(state[name])

    def __call__(self, batch: np.ndarray, seed: int) -> float:
        from magral_core.vision.evaluation import evaluate_coco

        heads = train_head(self.train, range(len(self.train.dataset)), self.pool,
                           [int(i) for i in np.asarray(batch).reshape(-1)], self.settings, seed=seed)
        detections = head_detections(self.val, heads, range(len(self.val.dataset)),
                                     self.settings.score_threshold)
        value = evaluate_coco(self.val.dataset, detections).map
        if np.isnan(value):  # no validation image has a box: the reward is undefined, not zero
            raise ValueError(
                f"expected validation images with boxes for the proxy's mAP, found none among "
                f"{len(self.val.dataset)} images"
            )
        return float(value)


def proxy_for(
    model: nn.Module,
    train: DetectionDataset,
    pool: DetectionDataset,
    val: DetectionDataset,
    settings: ProxySettings = ProxySettings(),
) -> CachedProxy:
    """The round's `CachedProxy` (a `ProxyFn`)."""
    return CachedProxy(model, train, pool, val, settings)


def make_proxy(
    model: nn.Module,
    dataset: DetectionDataset,
    labeled: np.ndarray,
    unlabeled: np.ndarray,
    settings: ProxySettings = ProxySettings(),
    *,
    seed: int = 0,
) -> CachedProxy:
    """`proxy_for` with the validation part carved (seeded, `split_validation`) from the `labeled` positions
    of `dataset`; `batch` positions index `unlabeled`. `model` must have been trained on the split's train
    part only (`split_validation(labeled, seed, settings.val_fraction)[0]`)."""
    train, val = split_validation(labeled, seed, settings.val_fraction)
    return proxy_for(model, dataset.subset(train.tolist()), dataset.subset(np.asarray(unlabeled).tolist()),
                     dataset.subset(val.tolist()), settings)
