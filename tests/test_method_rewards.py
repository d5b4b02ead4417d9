"""Reward estimators on a toy dataset whose best batch is known: bright squares (the one class) on a dark
background, 96-pixel images, the light detector (ImageNet MobileNetV2 trunk from the local weights
directory: a randomly initialised trunk gives features no head can learn from in seconds) trained briefly
on the labeled images. Pool images with squares are worth labeling; blank ones are not. The round's
detections are what a good detector would say (`_truth`), its embeddings the detector's own (`extract`), as
the service and the simulator hand them in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from magral_core.config import Config
from magral_core.method.rewards import REWARDS, NoiseControlled, RewardRound, make_reward
from magral_core.structures import AnnotatedImage, DetectionDataset, Detections
from magral_core.vision import engine
from magral_core.vision.detectors import build_detector

SIZE = 96
SIDE = 36


def _image(root: Path, image_id: int, boxes: list[list[float]], split: str) -> AnnotatedImage:
    pixels = np.random.default_rng(image_id).integers(0, 40, (SIZE, SIZE, 3)).astype(np.uint8)
    for x0, y0, x1, y1 in boxes:
        pixels[int(y0):int(y1), int(x0):int(x1)] = 230
    name = f"{image_id}.png"
    Image.fromarray(pixels).save(root / name)
    return AnnotatedImage(image_id, name, SIZE, SIZE, np.array(boxes, np.float32).reshape(-1, 4),
                          np.zeros(len(boxes), np.int64), split=split)


def _squares(k: int) -> list[list[float]]:
    rng = np.random.default_rng(1000 + k)
    out = []
    for _ in range(1 + k % 2):
        x, y = rng.integers(2, SIZE - SIDE - 2, 2)
        out.append([float(x), float(y), float(x + SIDE), float(y + SIDE)])
    apart = abs(out[0][0] - out[-1][0]) > SIDE or abs(out[0][1] - out[-1][1]) > SIDE
    return out if apart else out[:1]


def _truth(image: AnnotatedImage) -> Detections:
    """What a good detector would say: the image's boxes at score 0.9 (never read from pool labels by an
    estimator: tests hand these in as the round's detections)."""
    n = len(image.boxes_xyxy)
    return Detections(image.boxes_xyxy.copy(), np.full(n, 0.9, np.float32), image.labels.copy(),
                      np.tile(np.array([[0.1, 0.9]], np.float32), (n, 1)))


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("toy")
    ids = iter(range(1, 1000))
    labeled = [_image(root, next(ids), _squares(k) if k % 3 else [], "train") for k in range(12)]
    val = [_image(root, next(ids), _squares(50 + k), "val") for k in range(4)]
    pool = [_image(root, next(ids), _squares(100 + k) if k < 6 else [], "train") for k in range(12)]
    test = [_image(root, next(ids), _squares(200 + k), "test") for k in range(2)]
    data = DetectionDataset(root, ("cell",), tuple(labeled + val + pool + test))
    model = build_detector("frcnn_mobilenet_v2", num_classes=1, image_size=SIZE,
                           weights_dir=Config().weights_dir, pretrained=True, seed=0)
    engine.train_detector(model, data.subset(range(12)), epochs=6, batch_size=4, learning_rate=0.02, seed=0)
    lab, pol = data.subset(range(12)), data.subset(range(16, 28))
    _, lab_emb = engine.extract(model, lab)
    _, pool_emb = engine.extract(model, pol)
    return {"data": data, "model": model, "labeled": lab, "val": data.subset(range(12, 16)), "pool": pol,
            "test_ids": {im.image_id for im in test}, "lab_det": [_truth(im) for im in lab.images],
            "pool_det": [_truth(im) for im in pol.images], "lab_emb": lab_emb,
            "pool_emb": pool_emb}


def _round(toy: dict[str, Any], pool: DetectionDataset | None = None) -> RewardRound:
    return RewardRound(toy["model"], toy["labeled"], toy["val"], pool or toy["pool"], toy["pool_det"],
                       toy["pool_emb"], toy["lab_det"], toy["lab_emb"])


BEST, MIXED, BLANK = np.array([0, 1, 2, 3]), np.array([0, 1, 6, 7]), np.array([6, 7, 8, 9])


def _values(name: str, toy: dict[str, Any], pool: DetectionDataset | None = None) -> list[float]:
    reward = make_reward(name, _round(toy, pool), budget=4, seed=0, paired=True)
    return [reward(batch, 0) for batch in (BEST, MIXED, BLANK)]


@pytest.mark.parametrize("name", ["pseudo_label", "retrospective"])
def test_the_known_best_batch_ranks_first(toy, name) -> None:
    values = _values(name, toy)
    assert values[0] > max(values[1:]), values


def test_the_proxy_gives_values(toy) -> None:
    values = _values("proxy", toy)
    assert all(-1.0 <= v <= 1.0 for v in values)


def test_retrospective_never_reads_pool_labels(toy) -> None:
    # pool images whose labels would make the blank ones the best: the estimator must not notice
    flipped = tuple(
        AnnotatedImage(im.image_id, im.file_name, im.width, im.height,
                       np.array([[0, 0, 60, 60]] if k >= 6 else [], np.float32).reshape(-1, 4),
                       np.zeros(1 if k >= 6 else 0, np.int64), split=im.split)
        for k, im in enumerate(toy["pool"].images))
    poisoned = DetectionDataset(toy["pool"].root, toy["pool"].class_names, flipped)
    for name in ("retrospective", "pseudo_label"):
        assert _values(name, toy, poisoned) == _values(name, toy)


def test_retrospective_records_differ_only_by_their_batch(toy, monkeypatch) -> None:
    # every record trains the fold's core in the reference's order with the batch as the extra images
    from magral_core.method.rewards import retrospective

    calls: list[tuple[int, int, int]] = []
    train = retrospective.train_tail

    def spy(model: Any, labeled: Any, extra: Any, settings: Any, *, seed: int) -> Any:
        calls.append((len(labeled), len(extra), seed))
        return train(model, labeled, extra, settings, seed=seed)

    monkeypatch.setattr(retrospective, "train_tail", spy)
    settings = retrospective.RetrospectiveSettings(records=4, folds=2, head=retrospective.HeadSettings(
        epochs=1, reinit=True))
    reward = retrospective.RetrospectiveReward(
        toy["model"], toy["labeled"], toy["lab_det"], toy["lab_emb"], toy["pool_det"], toy["pool_emb"],
        toy["val"], batch_size=4, seed=3, settings=settings)
    reward.fit()
    assert calls == [(6, 0, 3), (6, 3, 3), (6, 0, 3), (6, 3, 3), (6, 3, 3), (6, 3, 3)]
    batches = [(rec.fold, rec.indices) for rec in reward.records]
    assert len(set(batches)) == len(batches)  # no record repeated
    for rec in reward.records:
        core, pseudo_pool = reward.splits[rec.fold]
        assert set(rec.indices) <= set(pseudo_pool.tolist()) and not set(rec.indices) & set(core.tolist())
    assert reward(np.zeros(0, np.int64), 0) == 0.0  # adding nothing adds nothing


def test_additive_ridge_recovers_per_image_gains() -> None:
    from magral_core.method.rewards.retrospective import additive_ridge

    rng = np.random.default_rng(0)
    a, w = 0.02, np.array([0.01, -0.005])
    batches = [rng.normal(size=(int(rng.integers(2, 5)), 2)) for _ in range(30)]
    values = np.array([len(b) * a + b.sum(0) @ w for b in batches])
    assert np.allclose(additive_ridge(batches, values, 0.0), [a, *w])
    shrunk = additive_ridge(batches, values, 1e6)
    assert np.allclose(shrunk[1:], 0.0, atol=1e-5)  # a large penalty leaves the unpenalised per-image gain
    counts = np.array([len(b) for b in batches], float)
    assert shrunk[0] == pytest.approx(counts @ values / (counts @ counts), rel=1e-4)


def test_estimators_never_read_the_test_split(toy, monkeypatch) -> None:
    read: set[int] = set()
    original = engine.DecodedImageCache.__getitem__

    def spy(self: engine.DecodedImageCache, index: int) -> Any:
        read.add(self.dataset.images[index].image_id)
        return original(self, index)

    monkeypatch.setattr(engine.DecodedImageCache, "__getitem__", spy)
    for name in REWARDS:
        _values(name, toy)
    assert read and not read & toy["test_ids"]


def test_noise_control_pairs_and_shares_the_seed() -> None:
    calls: list[tuple[int, int]] = []

    def reward(indices: np.ndarray, seed: int) -> float:
        calls.append((len(indices), seed))
        return float(len(indices)) + 10.0 * seed

    controlled = NoiseControlled(reward, seeds=2, paired=True, common_seed=5)
    assert controlled(np.arange(3), 99) == pytest.approx(3.0)  # the seed offset cancels
    assert {s for _, s in calls} == {5, 6}  # the record's own seed is replaced by the round's
    assert NoiseControlled(reward, paired=False)(np.arange(2), 1) == pytest.approx(12.0)


def test_unknown_reward_is_refused(toy) -> None:
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward("oracle", _round(toy), budget=4)
