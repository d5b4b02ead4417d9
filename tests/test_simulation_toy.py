"""The toy learner's closed form: more evidence, higher AP; the proxy counts a batch at half weight."""

from __future__ import annotations

import numpy as np
import pytest

from magral_core.simulation import SimulationSettings, ToyLearner, run_simulation, summarise

SETTINGS = SimulationSettings(
    initial=10, budget=5, rounds=4, strategies=("random", "entropy_max"), seeds=(0, 1)
)


def test_uncertainty_beats_random_on_the_toy() -> None:
    summary = summarise(run_simulation(ToyLearner(60), SETTINGS))
    assert summary["entropy_max"][4]["map_mean"] > summary["random"][4]["map_mean"]


def test_metrics_follow_the_closed_form() -> None:
    learner = ToyLearner(30, tau=12.0)
    labeled = np.arange(10)
    state = learner.train(labeled, seed=3)
    evidence = learner.counts[:10].sum(0)
    assert state.evidence == pytest.approx(evidence)
    ap = 0.9 * (1.0 - np.exp(-evidence / 12.0))
    metrics = learner.evaluate(state)
    assert metrics.ap50 == pytest.approx(ap.mean(), abs=0.005)
    assert metrics.map == pytest.approx(0.6 * metrics.ap50)
    assert learner.evaluate(learner.train(np.arange(30), seed=3)).map > metrics.map


def test_pool_and_proxy_cover_only_pool_images() -> None:
    learner = ToyLearner(30)
    labeled, unlabeled = np.arange(10), np.arange(10, 30)
    state = learner.train(labeled, seed=0)
    pool = learner.pool(state, unlabeled, labeled)
    assert len(pool) == 20 and pool.labeled_embeddings.shape[0] == 10
    assert [len(d) for d in pool.detections] == learner.counts[10:].sum(1).astype(int).tolist()
    proxy = learner.proxy(state, labeled, unlabeled)
    rich = np.argsort(-learner.counts[10:, 2])[:3]  # the pool images with the most rare objects
    assert proxy(rich, 0) > proxy(np.zeros(0, np.int64), 0)


def test_magral_rounds_record_how_the_policy_answers_to_its_reward() -> None:
    from magral_core.method.policy_training import TrainingSettings
    from magral_core.method.strategies import MagralSettings
    from magral_core.simulation import make_factory, run_curve

    factory = make_factory(MagralSettings(records=8, training=TrainingSettings(updates=6)))
    records = run_curve(ToyLearner(40), "magral", 0, SimulationSettings(initial=10, budget=5, rounds=2),
                        factory=factory)
    for record in records[:-1]:  # the last round trains and measures, it picks nothing
        d = record.diagnostics
        assert d["budget"] == 5 and 0 <= d["overlap_untrained"] <= 5 and 0 <= d["overlap_permuted"] <= 5
        assert d["records"] == 8 and d["record_value_std"] > 0
    assert records[-1].diagnostics == {}
    baseline = run_curve(ToyLearner(40), "random", 0, SimulationSettings(initial=10, budget=5, rounds=1))
    assert all(r.diagnostics == {} for r in baseline)
