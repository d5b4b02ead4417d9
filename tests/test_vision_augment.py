"""Augmentation keeps boxes valid: crops clip or drop boxes (never leave an empty one), pads move them,
images without boxes pass, and the same generator state gives the same result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magral_core.vision.augment import PAD_VALUE, Augmentation, colour_jitter, crop, pad


def _image(height: int = 40, width: int = 60) -> torch.Tensor:
    return torch.rand((3, height, width), generator=torch.Generator().manual_seed(0))


def test_crop_clips_kept_boxes_and_drops_mostly_cut_ones() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],  # entirely outside the window
                          [25.0, 15.0, 35.0, 25.0],  # entirely inside
                          [26.0, 5.0, 36.0, 15.0],  # half inside (rows 10..15 of 5..15)
                          [26.0, 2.0, 36.0, 12.0]])  # a fifth inside: dropped
    labels = torch.tensor([0, 1, 2, 3])
    # factor 2 on 60x40 -> a 30x20 window; position (0.5, 0.5) puts it at left 15, top 10
    out, kept, kept_labels = crop(_image(), boxes, labels, 2.0, np.array([0.5, 0.5]), 0.5)
    assert out.shape == (3, 20, 30)
    assert kept_labels.tolist() == [1, 2]
    assert kept.tolist() == [[10.0, 5.0, 20.0, 15.0], [11.0, 0.0, 21.0, 5.0]]


def test_crop_never_leaves_an_empty_box() -> None:
    rng = np.random.default_rng(0)
    image = _image(50, 50)
    for _ in range(200):
        xy = rng.uniform(0, 45, size=(8, 2))
        wh = rng.uniform(0.5, 20, size=(8, 2))
        boxes = torch.tensor(np.concatenate([xy, xy + wh], axis=1), dtype=torch.float32)
        _, kept, labels = crop(image, boxes, torch.arange(8), float(rng.uniform(1.01, 3)), rng.random(2),
                               float(rng.uniform(0.1, 1.0)))
        assert len(kept) == len(labels)
        if len(kept):
            assert bool(((kept[:, 2] - kept[:, 0]) >= 1).all() and ((kept[:, 3] - kept[:, 1]) >= 1).all())


def test_pad_moves_boxes_with_the_image() -> None:
    image = _image(40, 60)
    out, moved = pad(image, torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 0.5, np.array([1.0, 0.0]))
    assert out.shape == (3, 80, 120)
    assert moved.tolist() == [[61.0, 2.0, 63.0, 4.0]]
    assert torch.equal(out[:, 0:40, 60:120], image) and float(out[:, 50, 10].mean()) == PAD_VALUE


def test_colour_jitter_is_identity_at_one_and_stays_in_range() -> None:
    image = _image()
    assert torch.allclose(colour_jitter(image.clone(), 1.0, 1.0, 1.0), image, atol=1e-6)
    out = colour_jitter(image.clone(), 1.5, 1.5, 1.5)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_augmentation_is_seeded_and_handles_images_without_boxes() -> None:
    augment = Augmentation(zoom_range=(0.7, 2.0), colour=0.3)
    boxes, labels = torch.tensor([[5.0, 5.0, 30.0, 30.0]]), torch.tensor([1])
    first = augment(_image(), boxes, labels, np.random.default_rng(4))
    second = augment(_image(), boxes, labels, np.random.default_rng(4))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    empty_image, empty_boxes, empty_labels = augment(_image(), torch.zeros((0, 4)),
                                                     torch.zeros((0,), dtype=torch.int64),
                                                     np.random.default_rng(1))
    assert empty_boxes.shape == (0, 4) and empty_labels.shape == (0,) and empty_image.shape[0] == 3


def test_augmentation_off_changes_nothing_and_bad_settings_are_refused() -> None:
    off = Augmentation()
    assert not off.enabled
    image, boxes, labels = _image(), torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([0])
    out = off(image, boxes, labels, np.random.default_rng(0))
    assert torch.equal(out[0], image) and torch.equal(out[1], boxes)
    with pytest.raises(ValueError):
        Augmentation(zoom_range=(2.0, 1.0))
    with pytest.raises(ValueError):
        Augmentation(colour=1.0)
