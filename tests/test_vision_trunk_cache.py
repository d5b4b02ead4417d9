"""Frozen trunk maps reused across passes: the same detections, embeddings and training as computing them,
counted hits, the memory bound, a new trunk starting over, and the cases that must compute (images of
different sizes in one batch, augmented training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magral_core.config import Config, ConfigError
from magral_core.structures import AnnotatedImage, DetectionDataset
from magral_core.vision.augment import Augmentation
from magral_core.vision.detectors import build_detector
from magral_core.vision.engine import extract, train_detector
from magral_core.vision.trunk_cache import TrunkCache


def dataset_of(root: Path, sizes: list[tuple[int, int]]) -> DetectionDataset:
    """Images of the given (width, height), each with a bright square (class 1) and a bar (class 0)."""
    rng = np.random.default_rng(0)
    images = []
    for k, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        pixels[h // 6:h // 2, w // 5:w // 2] = (230, 40, 40)
        pixels[2 * h // 3:2 * h // 3 + 8, 4:w - 4] = (40, 230, 40)
        Image.fromarray(pixels).save(root / f"{k}.png")
        boxes = np.array([[w // 5, h // 6, w // 2, h // 2], [4, 2 * h // 3, w - 4, 2 * h // 3 + 8]],
                         np.float32)
        images.append(AnnotatedImage(k + 1, f"{k}.png", w, h, boxes, np.array([1, 0])))
    return DetectionDataset(root, ("bar", "square"), tuple(images))


def model_of(root: Path, seed: int = 0) -> torch.nn.Module:
    return build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=root, seed=seed)


def test_inference_from_cached_maps_equals_computing_them(tmp_path: Path) -> None:
    data = dataset_of(tmp_path, [(96, 72)] * 5)
    model = model_of(tmp_path)
    plain_det, plain_emb = extract(model, data, batch_size=2)
    cache = TrunkCache(2**30)
    for passes in (1, 2):
        det, emb = extract(model, data, batch_size=2, trunk=cache)
        assert np.allclose(emb, plain_emb, atol=1e-5)
        for a, b in zip(det, plain_det, strict=True):  # an untrained head ties scores: NMS keeps either box
            assert len(a) == len(b) and np.allclose(np.sort(a.scores), np.sort(b.scores), atol=1e-5)
        assert (len(cache), cache.misses, cache.hits) == (5, 5, 5 * (passes - 1))


def test_training_from_cached_maps_follows_the_computed_training(tmp_path: Path) -> None:
    data = dataset_of(tmp_path, [(96, 72)] * 4)
    losses = []
    cache = TrunkCache(2**30)
    for trunk in (None, cache):
        model = model_of(tmp_path)
        report = train_detector(model, data, epochs=3, batch_size=2, learning_rate=0.01, seed=3, trunk=trunk)
        losses.append(report.epoch_losses)
    assert np.allclose(losses[0], losses[1], rtol=1e-3)
    # every image was computed once per flip it was seen with; the later epochs read the cache
    assert cache.misses == len(cache) <= 2 * len(data) and cache.hits == 3 * len(data) - cache.misses > 0


def test_the_memory_bound_keeps_nothing_more_and_changes_no_result(tmp_path: Path) -> None:
    data = dataset_of(tmp_path, [(96, 72)] * 3)
    model = model_of(tmp_path)
    _, plain = extract(model, data, batch_size=3)
    full = TrunkCache(2**30)
    extract(model, data, batch_size=3, trunk=full)
    one_image = full.bytes // 3
    bounded = TrunkCache(one_image)
    for _ in range(2):
        _, emb = extract(model, data, batch_size=3, trunk=bounded)
        assert np.allclose(emb, plain, atol=1e-5)
    assert len(bounded) == 1 and bounded.bytes == one_image and bounded.misses == 5
    with pytest.raises(ValueError, match="max_bytes"):
        TrunkCache(-1)


def test_another_trunk_starts_the_cache_over(tmp_path: Path) -> None:
    data = dataset_of(tmp_path, [(96, 72)] * 2)
    cache = TrunkCache(2**30)
    extract(model_of(tmp_path, seed=0), data, trunk=cache)
    other = model_of(tmp_path, seed=1)  # without ImageNet weights each seed draws its own trunk
    _, plain = extract(other, data)
    _, emb = extract(other, data, trunk=cache)
    assert np.allclose(emb, plain, atol=1e-5) and cache.hits == 0 and cache.misses == 4 and len(cache) == 2


def test_a_batch_of_different_sizes_is_computed_as_a_batch(tmp_path: Path) -> None:
    data = dataset_of(tmp_path, [(96, 72), (72, 96), (96, 40)])
    model = model_of(tmp_path)
    _, plain = extract(model, data, batch_size=3)
    cache = TrunkCache(2**30)
    for _ in range(2):
        _, emb = extract(model, data, batch_size=3, trunk=cache)
        assert np.allclose(emb, plain, atol=1e-5)


def test_augmented_training_does_not_read_the_cache(tmp_path: Path) -> None:
    data = dataset_of(tmp_path, [(96, 72)] * 2)
    cache = TrunkCache(2**30)
    train_detector(model_of(tmp_path), data, epochs=1, batch_size=2, learning_rate=0.01, seed=0,
                   augment=Augmentation(zoom_range=(0.8, 1.25)), trunk=cache)
    assert cache.hits == cache.misses == len(cache) == 0


def test_the_cache_size_is_configured_and_checked() -> None:
    assert Config().trunk_cache_mib == 512
    with pytest.raises(ConfigError, match="MAGRAL_TRUNK_CACHE_MIB"):
        Config().replace(trunk_cache_mib=-1)


def test_a_pickled_cache_starts_empty(tmp_path: Path) -> None:
    import pickle

    cache = TrunkCache(2**30)
    extract(model_of(tmp_path), dataset_of(tmp_path, [(96, 72)]), trunk=cache)
    copy = pickle.loads(pickle.dumps(cache))
    assert len(cache) == 1 and len(copy) == 0 and copy.max_bytes == cache.max_bytes
