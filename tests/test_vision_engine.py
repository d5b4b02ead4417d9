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


def test_step_budget_validation_keeps_the_best_state_and_stops(dataset: DetectionDataset,
                                                               tmp_path: Path) -> None:
    model = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path)
    scores = iter([0.1, 0.5, 0.2, 0.3, 0.9])  # a fake evaluation: the best is the second check
    kept: list[dict[str, torch.Tensor]] = []

    def validate(candidate: Any) -> float:
        assert not candidate.training
        kept.append({k: v.clone() for k, v in candidate.state_dict().items()})
        return next(scores)

    report = train_detector(model, dataset, steps=10, batch_size=1, learning_rate=0.01, seed=0,
                            validate=validate, eval_every=2, patience=2)
    assert report.val_scores == [(2, 0.1), (4, 0.5), (6, 0.2), (8, 0.3)]  # stopped after 2 checks w/o gain
    assert report.iterations == 8 and report.best_step == 4
    final = model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in kept[1].items())
    assert not all(torch.equal(final[k], v) for k, v in kept[3].items())


def test_steps_and_epochs_are_exclusive_and_augmentation_trains(dataset: DetectionDataset,
                                                                 tmp_path: Path) -> None:
    from magral_core.vision.augment import Augmentation

    model = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        train_detector(model, dataset, epochs=1, steps=1, batch_size=1, learning_rate=0.01, seed=0)
    report = train_detector(model, dataset, steps=3, batch_size=1, learning_rate=0.01, seed=0,
                            augment=Augmentation(zoom_range=(0.5, 3.0), colour=0.5))
    assert report.iterations == 3 and report.epochs == 2 and report.best_step is None
    assert all(np.isfinite(report.epoch_losses))


def test_chosen_image_size_grows_for_small_boxes_within_the_maximum(dataset: DetectionDataset) -> None:
    from magral_core.config import Config
    from magral_core.vision.engine import chosen_image_size

    # boxes of sides 30 and sqrt(85 * 10) = 29.2 px on 96-px-wide images: 20 and 19.4 px at 64
    config = Config.from_env({}, image_size=64, max_image_size=100)
    assert chosen_image_size(dataset, config) == 100  # 64 * 32 / 19.4 = 105 -> 128, capped at 100
    assert chosen_image_size(dataset, config.replace(max_image_size=0)) == 64
    assert chosen_image_size(dataset, config.replace(image_size=128, max_image_size=400)) == 128


def test_fit_detector_follows_the_configured_rule(dataset: DetectionDataset, tmp_path: Path) -> None:
    from magral_core.config import Config
    from magral_core.vision.engine import fit_detector

    config = Config.from_env({}, schedule="budget", steps_per_image=1.0, min_steps=3, max_steps=4,
                             eval_every=2, patience=0, batch_size=1, learning_rate=0.01)
    model = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path)
    report = fit_detector(model, dataset, config, val=dataset)
    assert report.iterations == 3 and [s for s, _ in report.val_scores] == [2, 3]
    epochs = fit_detector(model, dataset, config.replace(schedule="epochs", epochs=2), val=dataset)
    assert epochs.iterations == 4 and epochs.val_scores == []


def test_machine_fingerprint_names_the_torch_build_and_threads() -> None:
    import torch

    from magral_core.vision.engine import machine_fingerprint

    print_ = machine_fingerprint()
    assert f"torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}" in print_
    assert f"; {torch.get_num_threads()} thread(s)" in print_
