"""Known answers for the PPAL-style strategy: the difficulty weight, the calibrated uncertainty, the
candidate set and the diversity stage on a toy embedding, images without detections, budget >= pool."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from magral_core.method.strategies import PpalStrategy, make_strategy
from magral_core.method.strategies.base import Pool
from magral_core.method.strategies.ppal import (
    calibrated_uncertainty,
    difficulty_weights,
    kmeans_pp_order,
    pool_class_quality,
)
from magral_core.structures import Detections


def dets(scores, labels=None) -> Detections:
    k = len(scores)
    lab = np.zeros(k, np.int64) if labels is None else np.asarray(labels, np.int64)
    return Detections(np.zeros((k, 4), np.float32), np.asarray(scores, np.float32), lab)


def h(s: float) -> float:
    """Entropy of (s, 1 - s) in nats."""
    return -(s * math.log(s) + (1 - s) * math.log(1 - s))


def test_difficulty_weight_runs_from_one_to_one_plus_the_bound() -> None:
    w = difficulty_weights(np.array([1.0, 0.0, 0.5, 0.9, -1.0, 2.0]), weight_ub=0.2, weight_alpha=0.3)
    b = math.exp(1 / 0.3) - 1
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(1.2)
    assert w[2] == pytest.approx(1 + 0.3 * 0.2 * math.log(1 + 0.5 * b))
    assert w[1] > w[2] > w[3] > w[0]  # harder classes weigh more
    assert w[4] == pytest.approx(1.2) and w[5] == pytest.approx(1.0)  # quality clipped to [0, 1]
    with pytest.raises(ValueError, match="weight_alpha"):
        difficulty_weights(np.zeros(2), weight_alpha=0.0)


def test_pool_quality_and_calibrated_uncertainty_known_answers() -> None:
    pool = [dets([0.9, 0.4], [0, 1]), dets([0.7], [0]), Detections.empty()]
    assert pool_class_quality(pool, 3) == pytest.approx([0.8, 0.4, 0.0])
    weights = np.array([1.0, 2.0, 3.0])
    u = calibrated_uncertainty(pool, weights)
    assert u == pytest.approx([h(0.9) + 2 * h(0.4), h(0.7), 0.0])


def test_the_harder_class_goes_first_at_equal_entropy() -> None:
    # class 0 is detected confidently elsewhere in the pool, class 1 is not: the two 0.6 detections have the
    # same entropy, but the one of class 1 is calibrated up
    detections = (dets([0.6], [0]), dets([0.6], [1]), dets([0.99, 0.99, 0.99], [0, 0, 0]), dets([0.6], [1]))
    pool = Pool(np.eye(4), detections)
    scores = PpalStrategy().scores(pool)
    assert scores[1] == scores[3] > scores[0] > scores[2]
    picks = PpalStrategy(candidate_ratio=1).rank(pool, 1, np.random.default_rng(0))
    assert picks[0].index in (1, 3) and [p.index for p in picks][-1] == 2
    # a given per-class quality (e.g. AP) overrides the pool's confidence: class 0 made the hard one
    given = PpalStrategy(candidate_ratio=1, class_quality=[0.0, 1.0]).rank(pool, 1, np.random.default_rng(0))
    assert given[0].index == 0
    with pytest.raises(ValueError, match="class_quality"):
        PpalStrategy(class_quality=[0.5]).scores(pool)


def _two_clusters() -> tuple[Pool, set[int], set[int], set[int]]:
    """Cluster A (0..5, at the origin, the most uncertain), cluster B (6..11, at (10, 0), a little less
    uncertain), certain images (12..15) far from both, one image without detections (16)."""
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(0, 0.01, (6, 2)), rng.normal(0, 0.01, (6, 2)) + np.array([10, 0]),
                          [[100, 0], [0, 100], [-100, 0], [0, -100]], [[50, 50]]])
    detections = ((dets([0.5, 0.5, 0.5]),) * 6 + (dets([0.5, 0.5, 0.6]),) * 6 + (dets([0.999, 0.999]),) * 4
                  + (Detections.empty(),))
    return Pool(emb, detections), set(range(6)), set(range(6, 12)), {12, 13, 14, 15, 16}


def test_the_batch_takes_from_both_clusters_and_never_a_certain_image() -> None:
    pool, a, b, certain = _two_clusters()
    top_uncertain = [p.index for p in make_strategy("entropy_sum").rank(pool, 2, np.random.default_rng(0))]
    assert set(top_uncertain[:2]) <= a  # plain uncertainty takes both from one cluster
    for seed in range(10):
        picks = make_strategy("ppal").rank(pool, 2, np.random.default_rng(seed))
        order = [p.index for p in picks]
        assert sorted(order) == list(range(len(pool)))
        assert len(set(order[:2]) & a) == 1 and len(set(order[:2]) & b) == 1, seed
        # candidates = 4 × 2 = 8 most uncertain (all of A, two of B); certain images come after them all
        assert set(order[:8]) <= a | b and set(order[-5:]) == certain
        assert [p.reason.split(":")[0] for p in picks[:3]] == ["ppal diversity"] * 2 + ["ppal candidate"]
        assert picks[-1].reason.startswith("ppal uncertainty")
        assert all(x.priority > y.priority for x, y in itertools.pairwise(picks))


def test_seeded_determinism() -> None:
    rng = np.random.default_rng(3)
    pool = Pool(rng.normal(size=(30, 4)), tuple(dets(rng.uniform(0.3, 0.7, k)) for k in [1, 2, 3] * 10))
    ppal = make_strategy("ppal")
    runs = [[p.index for p in ppal.rank(pool, 4, np.random.default_rng(s))] for s in range(6)]
    again = [p.index for p in ppal.rank(pool, 4, np.random.default_rng(0))]
    assert runs[0] == again
    assert any(r != runs[0] for r in runs[1:])  # the seed matters: the D² draws are random


def test_images_without_detections_and_budget_at_least_pool() -> None:
    empty = Pool(np.arange(10, dtype=np.float32).reshape(5, 2), (Detections.empty(),) * 5)
    picks = PpalStrategy().rank(empty, 2, np.random.default_rng(0))
    assert sorted(p.index for p in picks) == list(range(5))
    assert all(PpalStrategy().scores(empty) == 0.0)
    pool, *_ = _two_clusters()
    picks = PpalStrategy().rank(pool, 50, np.random.default_rng(0))
    assert sorted(p.index for p in picks) == list(range(len(pool)))
    assert all(p.reason.startswith("ppal diversity") for p in picks)
    assert PpalStrategy().rank(Pool(np.zeros((0, 2)), ()), 3, np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="budget"):
        PpalStrategy().rank(pool, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="candidate_ratio"):
        PpalStrategy(candidate_ratio=0.5)


def test_kmeans_pp_order_covers_every_row_and_handles_duplicates() -> None:
    x = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [0.0, 0.0]])
    order = kmeans_pp_order(x, 0, np.random.default_rng(0))
    assert order[0] == 0 and order[1] == 2 and sorted(order.tolist()) == [0, 1, 2, 3]


def test_the_service_ranks_the_whole_pool_with_it(tmp_path) -> None:
    from magral_core.config import Config
    from magral_core.method.strategies import STRATEGIES
    from magral_core.service.bindings import round_strategy

    assert "ppal" in STRATEGIES  # what `magral simulate --strategies` checks names against
    config = Config.from_env({"MAGRAL_FALLBACK_STRATEGY": "ppal", "MAGRAL_BUDGET": "2"})
    pool, *_ = _two_clusters()
    arrays = {"embeddings": pool.embeddings, "detections": pool.detections,
              "labeled_embeddings": np.zeros((0, 2), np.float32)}
    order, priorities = round_strategy(config.fallback_strategy, config).rank(arrays, [], tmp_path)
    assert sorted(order) == list(range(len(pool))) and priorities == sorted(priorities, reverse=True)
