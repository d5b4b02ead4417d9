"""Known answers for every strategy: uncertainty scores on hand-made detections, core-set on a toy
embedding, the registry, and MAGRAL wrapping a controller."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from magral_core.method.lookup_table import compute_record
from magral_core.method.policy import ControllerConfig, build_controller
from magral_core.method.policy_training import TrainingSettings
from magral_core.method.strategies import (
    STRATEGIES,
    MagralSettings,
    Pool,
    begin_fit,
    end_fit,
    fit_magral,
    image_uncertainty,
    initial_record_specs,
    k_center_greedy,
    make_strategy,
)
from magral_core.structures import Detections


def dets(scores, probs=None) -> Detections:
    k = len(scores)
    return Detections(
        np.zeros((k, 4), np.float32), np.asarray(scores, np.float32), np.zeros(k, np.int64),
        None if probs is None else np.asarray(probs, np.float32),
    )


# two detections with class_probs (background first): rows p1 = (.2, .5, .3), p2 = (.1, .8, .1)
H1 = -(0.2 * math.log(0.2) + 0.5 * math.log(0.5) + 0.3 * math.log(0.3))
H2 = -(0.1 * math.log(0.1) + 0.8 * math.log(0.8) + 0.1 * math.log(0.1))
PER_DET = {"entropy": (H1, H2), "least_confidence": (0.5, 0.2), "margin": (0.8, 0.3)}


@pytest.mark.parametrize("measure", sorted(PER_DET))
def test_uncertainty_known_answers(measure: str) -> None:
    d = dets([0.5, 0.8], [[0.2, 0.5, 0.3], [0.1, 0.8, 0.1]])
    a, b = PER_DET[measure]
    assert image_uncertainty(d, measure, "max") == pytest.approx(max(a, b), abs=1e-6)
    assert image_uncertainty(d, measure, "mean") == pytest.approx((a + b) / 2, abs=1e-6)
    assert image_uncertainty(d, measure, "sum") == pytest.approx(a + b, abs=1e-6)


def test_uncertainty_from_scores_alone() -> None:
    d = dets([0.9, 0.6])  # distributions (s, 1 - s)
    assert image_uncertainty(d, "least_confidence", "max") == pytest.approx(0.4, abs=1e-6)
    assert image_uncertainty(d, "margin", "mean") == pytest.approx((0.2 + 0.8) / 2, abs=1e-6)
    h = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    assert image_uncertainty(d, "entropy", "max") == pytest.approx(h, abs=1e-6)


def test_image_without_detections_scores_zero_and_ranks_last() -> None:
    for name in STRATEGIES:
        if name in ("random", "coreset", "ppal", "magral"):
            continue
        measure, aggregation = name.rsplit("_", 1)
        assert image_uncertainty(Detections.empty(2), measure, aggregation) == 0.0
    pool = Pool(np.zeros((3, 2)), (Detections.empty(), dets([0.55]), dets([0.95])))
    picks = make_strategy("entropy_max").rank(pool, 1, np.random.default_rng(0))
    assert [p.index for p in picks] == [1, 2, 0]
    assert picks[0].reason.startswith("entropy max 0.688 (rank 1)")
    assert picks[0].priority > picks[1].priority > picks[2].priority == 0.0


def test_every_named_strategy_ranks_the_whole_pool() -> None:
    rng = np.random.default_rng(0)
    pool = Pool(rng.normal(size=(12, 4)), tuple(dets(rng.uniform(0.1, 1, k)) for k in [0, 1, 2, 3] * 3),
                labeled_embeddings=rng.normal(size=(3, 4)))
    controller = build_controller(ControllerConfig(pool.features.shape[1]))  # type: ignore[union-attr]
    for name in STRATEGIES:
        strategy = make_strategy(name, controller=controller) if name == "magral" else make_strategy(name)
        picks = strategy.rank(pool, 5, np.random.default_rng(1))
        assert sorted(p.index for p in picks) == list(range(12)), name
        assert "(rank 1)" in picks[0].reason
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("bald")
    with pytest.raises(ValueError, match="controller"):
        make_strategy("magral")
    with pytest.raises(ValueError, match="budget"):
        make_strategy("random").rank(pool, 0, rng)


def test_random_is_seeded() -> None:
    pool = Pool(np.zeros((20, 1)), (Detections.empty(),) * 20)
    a = [p.index for p in make_strategy("random").rank(pool, 3, np.random.default_rng(5))]
    b = [p.index for p in make_strategy("random").rank(pool, 3, np.random.default_rng(5))]
    assert a == b and a != list(range(20))


def test_coreset_picks_the_far_points_first() -> None:
    # labeled at the origin; a tight cluster near it, and far points at (10, 0), (9.5, 0.5), (0, 8)
    emb = np.array([[0.1, 0], [0, 0.1], [0.1, 0.1], [10, 0], [9.5, 0.5], [0, 8]])
    order, gains, rest = k_center_greedy(emb, np.zeros((1, 2)), 2)
    assert order.tolist() == [3, 5]  # (9.5, .5) is close to (10, 0) once that is a centre
    assert gains.tolist() == pytest.approx([10.0, 8.0])
    assert rest[4] == pytest.approx(math.hypot(0.5, 0.5))
    pool = Pool(emb, (Detections.empty(),) * 6, labeled_embeddings=np.zeros((1, 2)))
    picks = make_strategy("coreset").rank(pool, 2, np.random.default_rng(0))
    assert [p.index for p in picks[:3]] == [3, 5, 4]
    assert [p.priority for p in picks] == sorted((p.priority for p in picks), reverse=True)
    assert picks[0].reason == "core-set distance 10 (rank 1)"


def test_coreset_without_labels_starts_from_the_farthest_point_from_the_mean() -> None:
    emb = np.array([[0.0, 0], [1, 0], [0, 1], [6, 6]])
    order, _, _ = k_center_greedy(emb, np.zeros((0, 2)), 4)
    assert order[0] == 3 and sorted(order.tolist()) == [0, 1, 2, 3]


def test_magral_strategy_takes_the_controller_top_b() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(15, 3)).astype(np.float32)
    pool = Pool(np.zeros((15, 2)), (Detections.empty(),) * 15, features=feats)
    controller = build_controller(ControllerConfig(3), seed=2)
    picks = make_strategy("magral", controller=controller).rank(pool, 4, rng)
    assert [p.index for p in picks[:4]] == controller.select(feats, 4).tolist()
    wrong = build_controller(ControllerConfig(5))
    with pytest.raises(ValueError, match="5 features"):
        make_strategy("magral", controller=wrong).rank(pool, 4, rng)


def test_fit_magral_learns_from_a_proxy_that_rewards_good_images() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, b = 60, 6
    feats = rng.normal(size=(n, 4)).astype(np.float32)
    good = set(np.argsort(-feats[:, 0])[:b].tolist())

    def proxy(indices: np.ndarray, seed: int) -> float:  # a noisy "mAP": fraction of good images chosen
        return len(good.intersection(indices.tolist())) / b + 0.01 * np.random.default_rng(seed).normal()

    settings = MagralSettings(records=24, training=TrainingSettings(updates=60, learning_rate=1e-2))
    strategy, report = fit_magral(feats, b, proxy, settings, seed=0)
    assert len(report.records) == 24
    assert {r.source for r in report.records} == {"random", "policy", "swap"}
    assert len(report.fidelity) == 2 and len(report.history) == 2
    chosen = strategy.controller.select(feats, b)
    assert len(good.intersection(chosen.tolist())) >= 3  # random expects 0.6


def test_fit_magral_reuses_records_computed_elsewhere() -> None:
    feats = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    settings = MagralSettings(records=8, training=TrainingSettings(updates=2))
    first = initial_record_specs(30, 5, settings, seed=4)
    assert len(first) == 4 and all(s.source == "random" and len(s.indices) == 5 for s in first)
    done = [compute_record(s, lambda idx, seed: 0.5) for s in first]
    calls: list[tuple[int, ...]] = []

    def proxy(indices: np.ndarray, seed: int) -> float:
        calls.append(tuple(indices.tolist()))
        return 0.1

    _, report = fit_magral(feats, 5, proxy, settings, seed=4, records=done)
    assert [r.value for r in report.records[:4]] == [0.5] * 4
    assert len(calls) == 4 and len(report.records) == 8  # only the near-policy records were computed


def test_fit_magral_in_two_stages_equals_the_whole_fit() -> None:
    feats = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32)
    settings = MagralSettings(records=6, training=TrainingSettings(updates=4, rollouts=2))

    def proxy(indices: np.ndarray, seed: int) -> float:
        return float(np.mean(indices)) / 20.0

    whole, whole_report = fit_magral(feats, 3, proxy, settings, seed=2)
    fit = begin_fit(feats, 3, proxy, settings, seed=2)
    assert len(fit.pending) == 3 and {s.source for s in fit.pending} == {"policy", "swap"}
    with pytest.raises(ValueError, match="expected 3 near-policy records, found 0"):
        end_fit(fit, feats, 3, settings, seed=2, records=[])
    near = [compute_record(s, proxy) for s in fit.pending]
    staged, report = end_fit(fit, feats, 3, settings, seed=2, records=near)
    assert [r.value for r in report.records] == [r.value for r in whole_report.records]
    assert np.allclose(staged.controller.scores(feats, 3), whole.controller.scores(feats, 3))


def test_policy_response_separates_a_reward_that_carries_the_answer_from_one_that_does_not() -> None:
    from magral_core.method.strategies import policy_response

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, b = 60, 6
    feats = rng.normal(size=(n, 4)).astype(np.float32)
    good = set(np.argsort(-feats[:, 0])[:b].tolist())
    settings = MagralSettings(records=24, training=TrainingSettings(updates=60, learning_rate=1e-2))

    def informative(indices: np.ndarray, seed: int) -> float:
        return len(good.intersection(indices.tolist())) / b

    def flat(indices: np.ndarray, seed: int) -> float:
        return 0.5

    strategy, report = fit_magral(feats, b, informative, settings, seed=0)
    response = policy_response(feats, b, strategy, report, settings, seed=0)
    assert set(response) >= {"overlap_untrained", "overlap_permuted", "record_value_std", "budget"}
    assert response["budget"] == b and response["record_value_std"] > 0
    # the reward moved the batch: it shares less with the untrained or the permuted-reward controller
    assert response["overlap_untrained"] < b and response["overlap_permuted"] < b

    strategy, report = fit_magral(feats, b, flat, settings, seed=0)
    response = policy_response(feats, b, strategy, report, settings, seed=0)
    # a flat reward carries nothing to permute: the permuted-reward controller picks the very same batch
    assert response["record_value_std"] == 0.0 and response["overlap_permuted"] == b
