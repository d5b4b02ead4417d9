"""The proxy's validation images are never in the training set of the detector whose parts it freezes: in the
simulator (`DetectorLearner`) and in the BCCD round benchmarks (`benchmarks.lookup_table.setup_round`), both
through `proxy.split_validation`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from benchmarks.lookup_table import Timer, setup_round
from magral_core.config import Config
from magral_core.datasets import load_dataset
from magral_core.method.proxy import make_proxy, split_validation
from magral_core.simulation import DetectorLearner
from magral_core.structures import DetectionDataset
from magral_core.vision import engine


@pytest.fixture
def trained_on(monkeypatch: pytest.MonkeyPatch) -> list[set[int]]:
    """Image ids of every `train_detector` call (the training itself skipped)."""
    calls: list[set[int]] = []

    def record(model: Any, dataset: DetectionDataset, **_: Any) -> None:
        calls.append({image.image_id for image in dataset.images})

    monkeypatch.setattr(engine, "train_detector", record)
    return calls


def test_split_validation_is_a_seeded_partition() -> None:
    labeled = np.arange(100, 140)
    train, val = split_validation(labeled, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and set(train) | set(val) == set(labeled)
    assert split_validation(labeled, seed=3)[1].tolist() == val.tolist()


def test_simulator_holds_the_proxy_validation_out(bccd_root, tmp_path, trained_on) -> None:
    data = load_dataset(bccd_root)
    pool, test = data.split("train").subset(range(24)), data.split("test").subset(range(2))
    learner = DetectorLearner(pool, test, Config(home=tmp_path, image_size=64, epochs=1))
    labeled, unlabeled = np.arange(0, 24, 2), np.arange(1, 24, 2)
    state = learner.train(labeled, seed=0)
    proxy = learner.proxy(state, labeled, unlabeled)
    assert proxy is not None
    val = {image.image_id for image in proxy.val.dataset.images}  # type: ignore[attr-defined]
    assert len(trained_on) == 1 and val and not val & trained_on[0]
    assert val | trained_on[0] == {pool.images[i].image_id for i in labeled}


def test_benchmark_round_holds_the_proxy_validation_out(bccd_root, tmp_path, trained_on) -> None:
    config = Config(home=tmp_path, image_size=64, epochs=1)
    r = setup_round(bccd_root, config, labeled=12, pool_limit=30, seed=0, timer=Timer())
    proxy = make_proxy(r.model, r.pool, r.labeled, r.unlabeled, seed=config.seed)
    val = {image.image_id for image in proxy.val.dataset.images}
    assert len(trained_on) == 1 and val and not val & trained_on[0]
    assert val == {r.pool.images[i].image_id for i in r.val_part}
