"""Training loop, inference and feature extraction on tiny images (one of them without boxes)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from magral_core.structures import AnnotatedImage, DetectionDataset, Detections
from magral_core.vision.detectors import build_detector
from magral_core.vision.engine import extract, learning_rate_at, predict, prepare, train_detector


def tiny_dataset(root: Path) -> DetectionDataset:
    """Two 96×72 images: one with a bright square (class 1) and a bar (class 0), one without boxes."""
    pixels = np.full((72, 96, 3), 40, np.uint8)
    pixels[10:40, 20:50] = (230, 40, 40)
    pixels[50:60, 5:90] = (40, 230, 40)
    Image.fromarray(pixels).save(root / "a.png")
    Image.fromarray(np.full((72, 96, 3), 40, np.uint8)).save(root / "b.png")
    images = (
        AnnotatedImage(1, "a.png", 96, 72, np.array([[20, 10, 50, 40], [5, 50, 90, 60]], np.float32),
                       np.array([1, 0])),
        AnnotatedImage(2, "b.png", 96, 72),
    )
    return DetectionDataset(root, ("bar", "square"), images)


@pytest.fixture()
def dataset(tmp_path: Path) -> DetectionDataset:
    return tiny_dataset(tmp_path)


def test_prepare_resizes_longest_side_and_reports_scale() -> None:
    out = prepare(np.zeros((30, 120, 3), np.uint8), 60)
    assert out.pixels.shape == (3, 15, 60) and out.pixels.dtype == torch.uint8 and out.scale == 0.5
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        prepare(np.zeros((30, 120), np.uint8), 60)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    rates = [learning_rate_at(s, 100, 0.1) for s in range(101)]
    assert rates[0] == pytest.approx(1e-4)
    assert max(rates) == pytest.approx(0.1)
    assert rates[5] == pytest.approx(0.1) and rates[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(rates[5:]))


def test_training_is_seeded_and_handles_images_without_boxes(dataset: DetectionDataset,
                                                              tmp_path: Path) -> None:
    losses = []
    for _ in range(2):
        model = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path)
        report = train_detector(model, dataset, epochs=2, batch_size=2, learning_rate=0.01, seed=3)
        losses.append(report.epoch_losses)
        assert report.iterations == 2 and report.images == 2 and not model.training
    assert all(np.isfinite(losses[0]))
    assert losses[0] == losses[1]


def test_extract_gives_detections_in_original_pixels_and_embeddings(dataset: DetectionDataset,
                                                                     tmp_path: Path) -> None:
    model = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path)
    cast(Any, model).roi_heads.score_thresh = 0.0  # untrained: keep every candidate, to have boxes to check
    detections, embeddings = extract(model, dataset, batch_size=1, score_threshold=0.0)
    assert embeddings.shape == (2, 256) and embeddings.dtype == np.float32  # two pooled 128-ch levels
    for det in detections:
        assert isinstance(det, Detections) and det.class_probs is not None
        assert det.class_probs.shape == (len(det), 3)
        assert len(det) > 0
        assert det.boxes_xyxy[:, 2].max() <= 96 + 1e-3
        assert det.boxes_xyxy[:, 3].max() <= 72 + 1e-3
        assert det.boxes_xyxy[:, 2].max() > 64  # beyond the 64-px network input: mapped back to 96×72
    arrays = [np.asarray(Image.open(dataset.path(im)).convert("RGB")) for im in dataset.images]
    again = predict(model, arrays, batch_size=1, score_threshold=0.0)  # same batching: same float sums
    for a, b in zip(detections, again, strict=True):
        np.testing.assert_allclose(a.boxes_xyxy, b.boxes_xyxy, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_threshold_filters_and_labels_are_zero_based(dataset: DetectionDataset, tmp_path: Path) -> None:
    model = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path)
    cast(Any, model).roi_heads.score_thresh = 0.0
    every = predict(model, dataset, score_threshold=0.0)
    scores = np.concatenate([det.scores for det in every])
    assert len(scores) > 2  # an untrained head with no threshold: candidates to filter exist
    threshold = float(np.median(scores))  # some detections fall below it, some do not
    kept = predict(model, dataset, score_threshold=threshold)
    assert 0 < sum(len(d) for d in kept) < len(scores)
    for det, all_of_them in zip(kept, every, strict=True):
        assert (det.scores >= threshold).all()
        assert len(det) == int((all_of_them.scores >= threshold).sum())
        assert set(det.labels.tolist()) <= {0, 1}


def test_train_rejects_empty_dataset(tmp_path: Path) -> None:
    model = build_detector("frcnn_mobilenet_v2", num_classes=1, image_size=64, weights_dir=tmp_path)
    with pytest.raises(ValueError, match="empty dataset"):
        train_detector(model, DetectionDataset(tmp_path, ("x",), ()), epochs=1, batch_size=1,
                       learning_rate=0.01, seed=0)
