"""Known answers for the look-up table: distances, nearest records and weights, surrogates, fidelity,
record generation and persistence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from magral_core.errors import DataError
from magral_core.method.lookup_table import (
    LookupTable,
    Record,
    RecordSpec,
    RidgeSurrogate,
    best_estimator,
    compute_record,
    estimate,
    fidelity,
    leave_one_out_fidelity,
    load_records,
    random_batches,
    save_records,
    specs,
    swapped_batches,
)

TOY = [Record(np.array([2, 1, 0]), 0.5), Record(np.array([3, 4, 5]), 0.2), Record(np.array([0, 1, 3]), 0.4)]


def test_distances_follow_overlaps() -> None:
    table = LookupTable(10, TOY)
    d = table.distances([np.array([0, 1, 4])])[0]
    # |a| + |r| - 2|a ∩ r| with overlaps 2, 1, 2
    np.testing.assert_allclose(d, [math.sqrt(2), 2.0, math.sqrt(2)])
    rng = np.random.default_rng(0)
    cands = [rng.choice(10, size=k, replace=False) for k in (1, 3, 5)]
    dense = lambda s: np.isin(np.arange(10), s).astype(float)  # noqa: E731
    expected = [[np.linalg.norm(dense(c) - dense(r.indices)) for r in TOY] for c in cands]
    np.testing.assert_allclose(table.distances(cands), expected)


def test_nearest_records_and_weights() -> None:
    table = LookupTable(10, TOY, neighbours=2)
    order, _, weights = table.nearest(np.array([0, 1, 4]))
    assert order.tolist() == [0, 2]
    np.testing.assert_allclose(weights, [0.5, 0.5])
    assert estimate(table, np.array([0, 1, 4])) == pytest.approx(0.45)
    table3 = LookupTable(10, TOY, neighbours=3)
    w = np.array([1 / math.sqrt(2), 1 / 2, 1 / math.sqrt(2)])
    assert estimate(table3, np.array([0, 1, 4])) == pytest.approx(w @ [0.5, 0.2, 0.4] / w.sum())


def test_an_exact_match_gives_its_own_value() -> None:
    table = LookupTable(10, TOY, neighbours=3)
    assert estimate(table, np.array([0, 1, 2])) == pytest.approx(0.5)
    both = table.estimate_many([np.array([5, 4, 3]), np.array([3, 1, 0])])
    assert both.tolist() == pytest.approx([0.2, 0.4])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one record"):
        LookupTable(10, [])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        LookupTable(10, TOY).estimate_many([np.array([10])])


def _linear_records(n: int, b: int, count: int, seed: int, weights: np.ndarray) -> list[Record]:
    rng = np.random.default_rng(seed)
    return [Record(s, float(weights[s].sum())) for s in random_batches(n, b, count, rng)]


def test_ridge_recovers_an_additive_value_and_wins_over_the_table() -> None:
    n, b = 40, 8
    weights = np.random.default_rng(1).normal(size=n)
    train = _linear_records(n, b, 60, 2, weights)
    test = _linear_records(n, b, 30, 3, weights)
    ridge = RidgeSurrogate(n, train, kind="indicator")
    assert fidelity(ridge, test) > 0.9
    features = np.stack([weights, np.random.default_rng(4).normal(size=n)], 1)
    ridge_f = RidgeSurrogate(n, train, kind="features", features=features)
    assert fidelity(ridge_f, test) > 0.99
    assert fidelity(LookupTable(n, train), test) < 0.8  # random records are far from every candidate
    chosen, report = best_estimator(n, train + test, np.random.default_rng(0), features=features)
    assert set(report) == {"lut", "ridge_indicator", "ridge_features"}
    assert chosen.name == "ridge_features"
    with pytest.raises(ValueError, match="feature matrix"):
        RidgeSurrogate(n, train, kind="features")


def test_best_estimator_with_few_records_is_the_table() -> None:
    chosen, report = best_estimator(10, TOY, np.random.default_rng(0))
    assert chosen.name == "lut" and all(math.isnan(v) for v in report.values())


def test_leave_one_out_fidelity_separates_two_neighbourhoods() -> None:
    # records near batch A are worth ~1, records near the disjoint batch B ~0: each record's nearest
    # neighbours are its own neighbourhood, so the leave-one-out estimates rank A above B
    n, rng = 40, np.random.default_rng(0)
    records = [
        Record(s, centre + 0.01 * rng.normal())
        for base, centre in ((np.arange(10), 1.0), (np.arange(20, 30), 0.0))
        for s in swapped_batches(base, n, 10, rng)
    ]
    loo = [estimate(LookupTable(n, records[:i] + records[i + 1 :], neighbours=3), r.indices)
           for i, r in enumerate(records)]
    assert min(loo[:10]) > 0.9 and max(loo[10:]) < 0.1
    # ranks inside each neighbourhood are noise, so ρ is that of a two-level split (≈ 0.75 at best)
    assert leave_one_out_fidelity(n, records, neighbours=3) > 0.5


def test_swapped_batches_stay_near_the_base() -> None:
    base = np.arange(100)
    for s in swapped_batches(base, 1000, 20, np.random.default_rng(0), fraction=(0.05, 0.2)):
        assert len(s) == 100 and len(np.unique(s)) == 100
        assert 5 <= 100 - len(np.intersect1d(s, base)) <= 20


def test_compute_record_and_persistence(tmp_path) -> None:
    spec = RecordSpec((4, 2, 9), seed=7, source="swap")
    rec = compute_record(spec, lambda idx, seed: float(idx.sum() + seed))
    assert rec.indices.tolist() == [2, 4, 9] and rec.value == 22.0 and rec.source == "swap"
    path = tmp_path / "t" / "lut.json"
    save_records(path, 10, [*TOY, rec])
    n, back = load_records(path)
    assert n == 10 and [r.value for r in back] == [0.5, 0.2, 0.4, 22.0]
    assert back[0].indices.tolist() == [0, 1, 2]
    assert list(path.parent.iterdir()) == [path]
    path.write_text(json.dumps({"records": []}))
    with pytest.raises(DataError, match="pool_size"):
        load_records(path)


def test_specs_share_one_proxy_seed() -> None:
    out = specs([np.array([3, 1]), np.array([0, 2])], "policy", seed=7)
    assert [(s.indices, s.seed, s.source) for s in out] == [((3, 1), 7, "policy"), ((0, 2), 7, "policy")]
