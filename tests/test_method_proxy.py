"""The semi-supervised proxy: flip consistency and ramp known answers, validation carving, and one tiny
proxy training on real BCCD images (one of them stripped of its boxes)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from magral_core.datasets import load_dataset
from magral_core.method.proxy import (
    FrozenFeatures,
    ProxySettings,
    carve_validation,
    consistency_mask,
    flip_boxes,
    flip_consistency,
    make_proxy,
    ramp,
    train_head,
)
from magral_core.structures import DetectionDataset
from magral_core.vision.detectors import build_detector


def test_ramp() -> None:
    assert ramp(0.0) == pytest.approx(math.exp(-5))
    assert ramp(0.5) == pytest.approx(math.exp(-1.25))
    assert ramp(1.0) == 1.0 and ramp(3.0) == 1.0


def test_flip_boxes() -> None:
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    assert flip_boxes(boxes, 100).tolist() == [[70.0, 5.0, 90.0, 25.0]]
    assert torch.equal(flip_boxes(flip_boxes(boxes, 100), 100), boxes)


def test_flip_consistency_known_answers() -> None:
    logits = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]])  # proposal 2 is background in both views
    assert consistency_mask(logits, logits).tolist() == [True, False]
    assert consistency_mask(logits, logits[[1, 0]]).tolist() == [True, True]  # either view counts
    deltas = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    mirrored = deltas.reshape(2, 3, 4) * torch.tensor([-1.0, 1.0, 1.0, 1.0])
    assert float(flip_consistency(logits, logits, deltas, mirrored.reshape(2, 12))) == pytest.approx(0.0)
    other = torch.tensor([[0.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    p = torch.softmax(logits[0], 0)
    q = torch.softmax(other[0], 0)
    kl = float((p * (p / q).log()).sum() + (q * (q / p).log()).sum())
    got = flip_consistency(logits, other, deltas, mirrored.reshape(2, 12))
    assert float(got) == pytest.approx(kl, rel=1e-5)  # only the foreground proposal counts
    background = torch.tensor([[3.0, 0.0, 0.0]], requires_grad=True)
    zero = flip_consistency(background, background, deltas[:1], deltas[:1])
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_carve_validation() -> None:
    train, val = carve_validation(np.arange(10, 30), 0.25, seed=0)
    assert len(val) == 5 and len(train) == 15 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(10, 30))
    assert carve_validation(np.arange(10, 30), 0.25, seed=0)[1].tolist() == val.tolist()
    assert [a.tolist() for a in carve_validation(np.array([4]), 0.25, seed=0)] == [[4], [4]]


def test_proxy_trains_and_is_deterministic(bccd_root, tmp_path) -> None:
    data = load_dataset(bccd_root).split("train").subset(range(9))
    empty = replace(data.images[1], boxes_xyxy=np.zeros((0, 4)), labels=np.zeros(0), iscrowd=np.zeros(0))
    data = replace(data, images=(data.images[0], empty, *data.images[2:]))
    model = build_detector("frcnn_mobilenet_v2", num_classes=3, image_size=96, weights_dir=tmp_path,
                           pretrained=False, seed=0)
    proxy = make_proxy(model, data, np.arange(5), np.arange(5, 9), ProxySettings(epochs=2), seed=0)
    a = proxy(np.array([0, 1]), 3)
    assert np.isfinite(a)  # an undefined mAP raises instead
    assert proxy(np.array([0, 1]), 3) == a
    warmed = make_proxy(model, data, np.arange(5), np.arange(5, 9), ProxySettings(epochs=2), seed=0)
    warmed.warm([0, 1])  # the one-off caching, done up front: same value, nothing left to compute
    assert len(warmed.train._targets) == len(warmed.train.dataset) and len(warmed.pool._cache) == 2
    assert len(warmed.val._cache) == len(warmed.val.dataset) and warmed(np.array([0, 1]), 3) == a
    with pytest.raises(ValueError, match="two-stage"):
        FrozenFeatures(torch.nn.Linear(2, 2), data)


def test_saved_and_loaded_proxy_gives_the_same_values_without_recomputing(bccd_root, tmp_path,
                                                                           monkeypatch) -> None:
    data = load_dataset(bccd_root).split("train").subset(range(7))
    model = build_detector("frcnn_mobilenet_v2", num_classes=3, image_size=64, weights_dir=tmp_path,
                           pretrained=False, seed=0)
    settings = ProxySettings(epochs=1)
    fresh = make_proxy(model, data, np.arange(4), np.arange(4, 7), settings, seed=0)
    fresh.warm(range(3))
    fresh.save(tmp_path / "cache.pt")
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []  # the temporary file was renamed
    expected = [fresh(np.array(batch), seed) for batch, seed in (([0, 2], 3), ([1], 4))]
    assert expected[0] != expected[1]  # the batches matter, so equal values below are not a coincidence
    loaded = make_proxy(model, data, np.arange(4), np.arange(4, 7), settings, seed=0)

    def no_forward(self, index):
        raise AssertionError(f"recomputed image {index}")

    monkeypatch.setattr(FrozenFeatures, "_compute", no_forward)
    monkeypatch.setattr(FrozenFeatures, "_maps", no_forward)
    loaded.load(tmp_path / "cache.pt")
    assert [loaded(np.array(batch), seed) for batch, seed in (([0, 2], 3), ([1], 4))] == expected
    other = make_proxy(model, data, np.arange(3), np.arange(3, 7), settings, seed=0)  # other images
    with pytest.raises(ValueError, match="does not match"):
        other.load(tmp_path / "cache.pt")


def _head_weights(model: torch.nn.Module, data: DetectionDataset, batch: list[int], weight: float
                  ) -> torch.Tensor:
    frozen = FrozenFeatures(model, data)
    settings = ProxySettings(epochs=2, consistency_weight=weight)
    head = train_head(frozen, range(5), frozen, batch, settings, seed=3)
    return torch.cat([p.detach().flatten() for p in head.parameters()])


def test_only_the_batch_content_changes_the_head(bccd_root, tmp_path) -> None:
    data = load_dataset(bccd_root).split("train").subset(range(9))
    model = build_detector("frcnn_mobilenet_v2", num_classes=3, image_size=96, weights_dir=tmp_path,
                           pretrained=False, seed=0)
    # without the consistency term the batch cannot matter: any batch, or none, trains the same head
    inert = [_head_weights(model, data, batch, 0.0) for batch in ([5, 6], [7, 8], [])]
    assert torch.equal(inert[0], inert[1]) and torch.equal(inert[0], inert[2])
    with torch.no_grad():  # a head that calls every proposal foreground, so the consistency term counts
        bias = model.get_parameter("roi_heads.box_predictor.cls_score.bias")
        bias.copy_(torch.tensor([0.0, 3.0, 0.0, 0.0]))
    assert not torch.equal(_head_weights(model, data, [5, 6], 1.0), _head_weights(model, data, [7, 8], 1.0))


def test_unlabeled_images_keep_only_the_top_proposals_the_consistency_reads(bccd_root, tmp_path) -> None:
    data = load_dataset(bccd_root).split("train").subset(range(7))
    model = build_detector("frcnn_mobilenet_v2", num_classes=3, image_size=96, weights_dir=tmp_path,
                           pretrained=False, seed=0)
    with torch.no_grad():  # every proposal foreground, so the consistency term (and the batch) counts
        model.get_parameter("roi_heads.box_predictor.cls_score.bias").copy_(torch.tensor([0.0, 3.0, 0, 0]))
    settings = ProxySettings(epochs=2, unlabeled_rois=8)
    proxy = make_proxy(model, data, np.arange(4), np.arange(4, 7), settings, seed=0)
    full = FrozenFeatures(model, proxy.pool.dataset)
    assert len(full[0].proposals) > 8 and len(proxy.pool[0].proposals) == 8
    assert torch.allclose(proxy.pool[0].reps, full[0].reps[:8], atol=1e-6)
    assert torch.allclose(proxy.pool[0].reps_flip, full[0].reps_flip[:8], atol=1e-6)
    untruncated = make_proxy(model, data, np.arange(4), np.arange(4, 7), settings, seed=0)
    untruncated.pool = full
    assert proxy(np.array([0, 2]), 1) == pytest.approx(untruncated(np.array([0, 2]), 1), abs=1e-6)
