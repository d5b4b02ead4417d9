"""The detector-backed learner on a few real BCCD images: two rounds of the protocol, a pool that covers only
the unlabeled pool images, and a proxy that gives an mAP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magral_core.config import Config
from magral_core.datasets import load_dataset
from magral_core.simulation import DetectorLearner, SimulationSettings, run_curve


@pytest.mark.slow
def test_two_rounds_on_bccd(bccd_root, tmp_path) -> None:
    data = load_dataset(bccd_root)
    pool, test = data.split("train").subset(range(8)), data.split("test").subset(range(2))
    # no weights under tmp_path: a randomly initialised detector, tiny images, one epoch
    config = Config(home=tmp_path, image_size=64, epochs=1, batch_size=2)
    learner = DetectorLearner(pool, test, config)
    records = run_curve(learner, "entropy_max", 0, SimulationSettings(initial=4, budget=2, rounds=1))
    assert [r.n_labeled for r in records] == [4, 6]
    assert len(records[0].selected) == 2 and not set(records[0].selected) & set(records[0].labeled)
    assert all(0.0 <= r.map <= 1.0 and 0.0 <= r.ap50 <= 1.0 for r in records)

    labeled, unlabeled = np.array(records[0].labeled), np.setdiff1d(np.arange(8), records[0].labeled)
    state = learner.train(labeled, seed=0)
    features = learner.pool(state, unlabeled, labeled)
    assert len(features) == 4 and features.labeled_embeddings.shape[0] == 4
    proxy = learner.proxy(state, labeled, unlabeled)
    assert proxy is not None and 0.0 <= proxy(np.array([0, 1]), 0) <= 1.0


@pytest.mark.slow
def test_a_warm_round_starts_from_the_previous_model_with_warm_epochs(
    bccd_root, tmp_path, monkeypatch
) -> None:
    from magral_core.vision import engine

    data = load_dataset(bccd_root)
    pool, test = data.split("train").subset(range(8)), data.split("test").subset(range(2))
    learner = DetectorLearner(pool, test, Config(home=tmp_path, image_size=64, epochs=1, warm_epochs=2,
                                                 batch_size=2))
    previous = learner.train(np.arange(4), seed=0)
    seen: dict[str, object] = {}

    def fit(model, dataset, config, **kwargs):  # record what the warm training starts from and runs
        seen["epochs"] = config.epochs
        seen["same"] = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                previous.state_dict().values(), strict=True))

    monkeypatch.setattr(engine, "fit_detector", fit)
    learner.train(np.arange(6), seed=1, previous=previous)
    assert seen == {"epochs": 2, "same": True}
    learner.train(np.arange(6), seed=1)  # cold: the configured epochs, a fresh seeded model
    assert seen == {"epochs": 1, "same": False}
