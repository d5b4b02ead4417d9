"""Training and inference of registered detectors on `DetectionDataset`s (CPU or one GPU: training runs on
the `device` it is given, inference on the device the model's parameters are on; `torch_device` checks a
configured name).

Conventions: images enter as RGB uint8 arrays (H, W, 3) and are resized once so that their longest side is
the detector's `image_size` (kept in memory across epochs as uint8); the detector's own transform then
normalises them. Boxes given to and returned from this module are absolute xyxy pixels of the ORIGINAL
image and 0-based dataset labels; the detector sees label + 1 (0 is background).

Kept as one module because training, extraction and prediction share image preparation, batching and seeding.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magral_core.config import Config, ConfigError
from magral_core.datasets.images import read_image_rgb
from magral_core.structures import AnnotatedImage, DetectionDataset, Detections
from magral_core.vision.augment import Augmentation
from magral_core.vision.detectors import detector_spec
from magral_core.vision.detectors.sizing import box_sides_at, image_size_for
from magral_core.vision.evaluation import evaluate_coco
from magral_core.vision.schedule import BestKeeper, StepBudget, evaluation_steps
from magral_core.vision.trunk_cache import TrunkCache

log = logging.getLogger(__name__)

WARMUP_FRACTION = 0.05  # of all iterations, linear warmup from 1/1000 of the peak rate
MAX_WARMUP_ITERS = 200
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
GRAD_CLIP = 10.0  # max global L2 norm: early Faster R-CNN losses can spike on crowded images


def setup_torch(threads: int) -> None:
    """Process-wide CPU settings of every entry point: `threads` intra-op threads, denormals flushed
    (denormal arithmetic in small late-training gradients can make CPU steps many times slower)."""
    # numpy computes (and caches) its float limits on first use and warns if denormals read as zero by then
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        np.finfo(np.float32), np.finfo(np.float64)
    torch.set_flush_denormal(True)
    torch.set_num_threads(max(1, threads))


def machine_fingerprint() -> str:
    """The machine a model is trained on, as far as it decides float results: CPU model, the CPU kernels
    torch dispatches to (e.g. AVX512), torch's version and this process's thread count. Two runs with
    equal inputs, seeds and settings give equal models on equal fingerprints; across fingerprints they
    may differ."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                         model)
    except OSError:
        pass
    return (f"{model}; torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}; "
            f"{torch.get_num_threads()} thread(s)")


def torch_device(name: str) -> torch.device:
    """The torch device `name` (`Config.device`: "cpu", "cuda", "cuda:<index>"), checked against what this
    process's torch can reach. Raises ConfigError naming MAGRAL_DEVICE when CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(
                f"MAGRAL_DEVICE is {name!r} but torch sees {count} CUDA device(s) here "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use 'cpu' or a "
                "device this machine has"
            )
    return device


@dataclass(frozen=True)
class PreparedImage:
    """An image resized for the detector: `pixels` (3, h, w) uint8 and `scale` = resized / original size."""

    pixels: Tensor
    scale: float


def prepare(rgb: np.ndarray, image_size: int) -> PreparedImage:
    """Resize an (H, W, 3) uint8 RGB array so that its longest side is `image_size` (bilinear,
    antialiased)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, found {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    scale = image_size / max(height, width)
    writable = np.array(rgb, copy=not rgb.flags.writeable, order="C")  # torch cannot wrap read-only arrays
    pixels = torch.from_numpy(writable).permute(2, 0, 1)  # (3, H, W) uint8
    if scale != 1.0:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        resized = F.interpolate(pixels[None].float(), size=size, mode="bilinear", antialias=True,
                                align_corners=False)
        pixels = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return PreparedImage(pixels, scale)


class DecodedImageCache:
    """Decoded, resized images of one dataset, read from disk once and kept across epochs."""

    def __init__(self, dataset: DetectionDataset, image_size: int) -> None:
        self.dataset = dataset
        self.image_size = image_size
        self._cache: dict[int, PreparedImage] = {}

    def __getitem__(self, index: int) -> PreparedImage:
        if index not in self._cache:
            image = self.dataset.images[index]
            self._cache[index] = prepare(read_image_rgb(self.dataset.path(image)), self.image_size)
        return self._cache[index]


@dataclass(frozen=True)
class TrainReport:
    """What a training run did: the schedule, its duration and the mean loss of every epoch (the last one
    possibly partial); with validation, every (step, score) evaluated and the step whose state was kept."""

    epochs: int
    iterations: int
    images: int
    seconds: float
    cpu_seconds: float
    """Process CPU time (all threads): on a shared machine, `seconds` also counts time spent waiting."""
    epoch_losses: list[float] = field(default_factory=list)
    val_scores: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    """Steps done when the kept state was reached (None: no validation, the last state is kept)."""

    @property
    def seconds_per_image(self) -> float:
        """Wall seconds per training image seen (epochs × images)."""
        return self.seconds / max(1, self.epochs * self.images)


def learning_rate_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over the first WARMUP_FRACTION of `total` steps (at most MAX_WARMUP_ITERS), then cosine
    decay from `peak` to zero at step `total`."""
    warmup = min(MAX_WARMUP_ITERS, max(1, int(WARMUP_FRACTION * total)))
    if step < warmup:
        return peak * (0.001 + 0.999 * step / warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _target(image: AnnotatedImage, prepared: PreparedImage, flip: bool, device: torch.device,
            augment: Augmentation | None = None, rng: np.random.Generator | None = None
            ) -> tuple[Tensor, dict[str, Tensor]]:
    """Float image in [0, 1] and its target in resized pixels (labels + 1), optionally flipped left-right,
    then augmented by `augment` with draws from `rng`."""
    pixels = prepared.pixels.to(dtype=torch.float32).div_(255.0)  # (3, h, w)
    boxes = torch.as_tensor(image.boxes_xyxy[~image.iscrowd], dtype=torch.float32).reshape(-1, 4)
    boxes = boxes * prepared.scale  # (N, 4)
    labels = torch.as_tensor(image.labels[~image.iscrowd], dtype=torch.int64) + 1  # (N,)
    if flip:
        width = pixels.shape[-1]
        pixels = pixels.flip(-1)
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if augment is not None and rng is not None:
        pixels, boxes, labels = augment(pixels, boxes, labels, rng)
    return pixels.to(device), {"boxes": boxes.to(device), "labels": labels.to(device)}


def _batches(order: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield list(order[start:start + batch_size])


def _progress(iterable: Iterable, enabled: bool, total: int, desc: str) -> Iterable:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def train_detector(
    model: nn.Module,
    dataset: DetectionDataset,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: str = "cpu",
    progress: bool = False,
    cache: DecodedImageCache | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    augment: Augmentation | None = None,
    validate: Callable[[nn.Module], float] | None = None,
    eval_every: int = 0,
    patience: int = 0,
    trunk: TrunkCache | None = None,
) -> TrainReport:
    """Train `model` in place on every image of `dataset` (images without boxes included) for `epochs`
    passes or `steps` optimiser steps (exactly one of them): SGD (momentum 0.9, weight decay 1e-4), warmup +
    cosine decay of `learning_rate` over the whole run, random horizontal flips, then `augment` when given,
    `batch_size` images per step, the data order seeded by `seed` (augmentation draws from its own
    generator, so turning it on leaves the data order and flips as they were).

    With `validate` (model in eval mode -> score, higher is better) and `eval_every` > 0 the score is taken
    every `eval_every` steps and after the last; the state with the best score is loaded back at the end,
    and training stops after `patience` evaluations without a gain (0: runs the whole budget).

    `cache` (same dataset and size) can be passed to reuse decoded images; `trunk` to reuse frozen trunk
    maps (`vision.trunk_cache`; read only without `augment`); `on_epoch(epoch, mean_loss)` is called after
    each epoch. Raises ValueError for an empty dataset or non-positive schedule values.
    """
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs and steps")
    length = epochs if epochs is not None else steps
    if length is None or length < 1 or batch_size < 1 or learning_rate <= 0:
        raise ValueError(f"epochs/steps, batch_size and learning_rate must be > 0, found {length}, "
                         f"{batch_size}, {learning_rate}")
    spec = detector_spec(model)
    cache = cache or DecodedImageCache(dataset, spec.image_size)
    dev = torch_device(device)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(seed)
    augment_rng = np.random.default_rng([seed, 1])
    generator = torch.Generator().manual_seed(seed)  # torchvision's samplers draw from the global generator
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    total = epochs * steps_per_epoch if epochs is not None else int(length)
    n_epochs = math.ceil(total / steps_per_epoch)
    checks = set(evaluation_steps(total, eval_every)) if validate is not None else set()
    keeper = BestKeeper(patience)
    best_state: dict[str, Tensor] | None = None
    step = 0
    epoch_losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    with _seeded(generator):
        for epoch in range(n_epochs):
            order = rng.permutation(len(dataset))
            flips = rng.random(len(dataset)) < 0.5
            running, done = 0.0, 0
            batches = _progress(_batches(order.tolist(), batch_size), progress, steps_per_epoch,
                                f"epoch {epoch + 1}/{n_epochs}")
            for batch in batches:
                if step == total or keeper.stop:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(step, total, learning_rate)
                images, targets = zip(
                    *(_target(dataset.images[i], cache[i], bool(flips[i]), dev, augment, augment_rng)
                      for i in batch), strict=True
                )
                given: AbstractContextManager[object] = nullcontext()
                if trunk is not None and augment is None:
                    keys = [_trunk_key(dataset, i, bool(flips[i]), spec.image_size) for i in batch]
                    given = trunk.context(model, keys, images)
                with given:
                    losses = model(list(images), list(targets))
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss is {loss.item()} at step {step} (epoch {epoch + 1}); lower the "
                        f"learning rate (now {learning_rate})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                optimizer.step()
                running += loss.item()
                done += 1
                step += 1
                if step in checks and validate is not None:
                    model.eval()
                    score = float(validate(model))
                    model.train()
                    if keeper.update(step, score):
                        best_state = copy.deepcopy(model.state_dict())
                    log.info("step=%d/%d val=%.4f best=%.4f@%d", step, total, score, keeper.best_score,
                             keeper.best_step)
            if done == 0:
                break
            epoch_losses.append(running / done)
            log.info("epoch=%d/%d loss=%.4f elapsed=%.0fs cpu=%.0fs", epoch + 1, n_epochs, epoch_losses[-1],
                     time.perf_counter() - start, time.process_time() - cpu_start)
            if on_epoch is not None:
                on_epoch(epoch + 1, epoch_losses[-1])
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainReport(len(epoch_losses), step, len(dataset), time.perf_counter() - start,
                       time.process_time() - cpu_start, epoch_losses, keeper.history,
                       keeper.best_step if best_state is not None else None)


def _trunk_key(dataset: DetectionDataset, index: int, flip: bool, image_size: int) -> tuple[str, bool, int]:
    """What decides an image's trunk maps: its file, whether it is flipped, the input size."""
    return str(dataset.path(dataset.images[index])), flip, image_size


@contextmanager
def _seeded(generator: torch.Generator) -> Iterator[None]:
    """Seed torch's global generator from `generator` for a block, restoring the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        yield


ImagesLike = DetectionDataset | Sequence[np.ndarray]


def _prepared(images: ImagesLike, image_size: int, cache: DecodedImageCache | None
              ) -> Callable[[int], PreparedImage]:
    if isinstance(images, DetectionDataset):
        source = cache if cache is not None else DecodedImageCache(images, image_size)
        return source.__getitem__
    return lambda i: prepare(images[i], image_size)


def _to_detections(output: dict[str, Tensor], scale: float, score_threshold: float, num_classes: int
                   ) -> Detections:
    keep = output["scores"] >= score_threshold
    probs = output.get("class_probs")
    return Detections(
        boxes_xyxy=(output["boxes"][keep] / scale).cpu().numpy().astype(np.float32),
        scores=output["scores"][keep].cpu().numpy().astype(np.float32),
        labels=(output["labels"][keep] - 1).cpu().numpy().astype(np.int64),
        class_probs=None if probs is None else probs[keep].cpu().numpy().astype(np.float32),
    )


def _pool(features: Tensor | dict[str, Tensor]) -> Tensor:
    """Global-average-pool every feature map of a backbone output and concatenate: (B, D)."""
    maps = list(features.values()) if isinstance(features, dict) else [features]
    return torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)


@torch.no_grad()
def extract(
    model: nn.Module,
    images: ImagesLike,
    *,
    batch_size: int = 4,
    score_threshold: float = 0.05,
    progress: bool = False,
    cache: DecodedImageCache | None = None,
    trunk: TrunkCache | None = None,
) -> tuple[list[Detections], np.ndarray]:
    """One forward pass per batch giving, per image, its detections (original pixels, 0-based labels,
    `class_probs` when the detector exposes them, scores >= `score_threshold`) and its backbone embedding:
    the global average of every backbone feature map, concatenated, (N, D) float32.

    `images` is a DetectionDataset (files are read) or a sequence of (H, W, 3) uint8 RGB arrays; for a
    DetectionDataset, `trunk` reuses frozen trunk maps (`vision.trunk_cache`).
    """
    spec = detector_spec(model)
    get = _prepared(images, spec.image_size, cache)
    device = next(model.parameters()).device
    pooled: list[Tensor] = []
    backbone = model.get_submodule("backbone")
    handle = backbone.register_forward_hook(lambda _m, _i, out: pooled.append(_pool(out).cpu()))
    was_training = model.training
    model.eval()
    detections: list[Detections] = []
    count = len(images)
    try:
        batches = _progress(_batches(range(count), batch_size), progress, math.ceil(count / batch_size),
                            "inference")
        for batch in batches:
            prepared = [get(i) for i in batch]
            tensors = [p.pixels.to(device=device, dtype=torch.float32).div_(255.0) for p in prepared]
            given: AbstractContextManager[object] = nullcontext()
            if trunk is not None and isinstance(images, DetectionDataset):
                keys = [_trunk_key(images, i, False, spec.image_size) for i in batch]
                given = trunk.context(model, keys, tensors)
            with given:
                outputs = model(tensors)
            detections += [_to_detections(o, p.scale, score_threshold, spec.num_classes)
                           for o, p in zip(outputs, prepared, strict=True)]
    finally:
        handle.remove()
        model.train(was_training)
    embeddings = torch.cat(pooled).numpy().astype(np.float32) if pooled else np.zeros((0, 0), np.float32)
    return detections, embeddings


def predict(
    model: nn.Module,
    images: ImagesLike,
    *,
    batch_size: int = 4,
    score_threshold: float = 0.05,
    progress: bool = False,
    cache: DecodedImageCache | None = None,
    trunk: TrunkCache | None = None,
) -> list[Detections]:
    """Detections per image (see `extract`), in the order of `images`."""
    detections, _ = extract(model, images, batch_size=batch_size, score_threshold=score_threshold,
                            progress=progress, cache=cache, trunk=trunk)
    return detections


def augmentation_of(config: Config) -> Augmentation | None:
    """The configured training augmentation, or None when every part of it is off."""
    augment = Augmentation(zoom_range=(config.zoom_min, config.zoom_max), colour=config.colour_jitter)
    return augment if augment.enabled else None


def trunk_cache_of(config: Config) -> TrunkCache | None:
    """A trunk-map cache of `config.trunk_cache_mib` MiB, or None when it is 0 (off)."""
    return TrunkCache(config.trunk_cache_mib * 2**20) if config.trunk_cache_mib > 0 else None


def fit_detector(
    model: nn.Module,
    train: DetectionDataset,
    config: Config,
    *,
    val: DetectionDataset | None = None,
    progress: bool = False,
    cache: DecodedImageCache | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    trunk: TrunkCache | None = None,
) -> TrainReport:
    """Train `model` on `train` by the configured rule, the one rounds, `magral train` and the simulator
    share: `schedule` "epochs" runs `epochs` passes; "budget" runs `StepBudget(steps_per_image, min_steps,
    max_steps).steps(len(train))` steps and, when `val` has images, checks its mAP every `eval_every` steps,
    keeps the best state and stops after `patience` checks without a gain. `val` is the caller's
    validation part of the labeled set (never a test split); it is only read under "budget". Frozen trunk
    maps are reused from `trunk`, or from a cache of `config.trunk_cache_mib` for this training alone.
    """
    trunk = trunk if trunk is not None else trunk_cache_of(config)
    options: dict[str, Any] = {
        "batch_size": config.batch_size, "learning_rate": config.learning_rate, "seed": config.seed,
        "device": config.device, "progress": progress, "cache": cache, "on_epoch": on_epoch,
        "augment": augmentation_of(config), "trunk": trunk,
    }
    if config.schedule == "epochs":
        return train_detector(model, train, epochs=config.epochs, **options)
    steps = StepBudget(config.steps_per_image, config.min_steps, config.max_steps).steps(len(train))
    if val is not None and len(val) > 0 and config.eval_every > 0:
        val_cache = DecodedImageCache(val, detector_spec(model).image_size)

        def validate(candidate: nn.Module) -> float:
            detections = predict(candidate, val, score_threshold=config.score_threshold, cache=val_cache,
                                 trunk=trunk)
            return evaluate_coco(val, detections).map

        options.update(validate=validate, eval_every=config.eval_every, patience=config.patience)
    return train_detector(model, train, steps=steps, **options)


def chosen_image_size(train: DetectionDataset, config: Config) -> int:
    """The input size to build the detector with for `train`: `config.image_size`, raised toward
    `config.max_image_size` when the labeled boxes are small (`detectors.sizing.image_size_for`)."""
    if config.max_image_size <= config.image_size:
        return config.image_size
    widths, heights, longest = [], [], []
    for image in train.images:
        boxes = image.boxes_xyxy[~image.iscrowd].reshape(-1, 4)
        widths.append(boxes[:, 2] - boxes[:, 0])
        heights.append(boxes[:, 3] - boxes[:, 1])
        longest.append(np.full(len(boxes), max(image.width, image.height), np.float64))
    if not widths:
        return config.image_size
    sides = box_sides_at(np.concatenate(widths), np.concatenate(heights), np.concatenate(longest),
                         config.image_size)
    return image_size_for(sides, config.image_size, config.max_image_size)
