"""Known answers of the paired statistics on made-up curves: t intervals, areas, paired differences per
round, paired areas and the gain averaged over rounds."""

from __future__ import annotations

import math

import pytest

from magral_core.simulation.protocol import RoundRecord
from magral_core.simulation.statistics import (
    areas,
    curve_area,
    paired_areas,
    paired_differences,
    paired_gain_over_rounds,
    round_zero_spread,
    t_interval,
)

T2 = 4.302652729749464  # Student t, 97.5% quantile, 2 degrees of freedom


def curve(strategy: str, seed: int, values: list[float]) -> list[RoundRecord]:
    """Rounds at 20, 40, 60, ... labeled images."""
    return [RoundRecord(strategy, seed, r, 20 + 20 * r, v, v, {}, 0.0, {}, [], [])
            for r, v in enumerate(values)]


# random's seeds differ by 10 points; the strategy is 2, 3 and 4 points above random under the same seed
RANDOM = [[0.10, 0.20, 0.30], [0.20, 0.30, 0.40], [0.30, 0.40, 0.50]]
GAIN = [[0.0, 0.02, 0.04], [0.0, 0.03, 0.05], [0.0, 0.04, 0.06]]


def records() -> list[RoundRecord]:
    out = []
    for seed, (base, gain) in enumerate(zip(RANDOM, GAIN, strict=True)):
        out += curve("random", seed, base)
        out += curve("ppal", seed, [b + g for b, g in zip(base, gain, strict=True)])
    return out


def test_t_interval_known_answers() -> None:
    x = t_interval([1.0, 2.0, 3.0])
    assert (x.mean, x.n) == (2.0, 3)
    half = T2 / math.sqrt(3)  # sd = 1
    assert x.high - x.mean == pytest.approx(half) and x.mean - x.low == pytest.approx(half)
    one = t_interval([5.0])
    assert one.mean == 5.0 and math.isnan(one.low) and math.isnan(one.high) and one.n == 1
    assert math.isnan(t_interval([]).mean)
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=1.0)


def test_curve_area_known_answers() -> None:
    assert curve_area([0, 10, 20], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert curve_area([20, 0, 10], [1.0, 0.0, 1.0]) == pytest.approx(0.75)  # points sorted first
    assert curve_area([40], [0.3]) == pytest.approx(0.3)
    assert curve_area([20, 40], [0.5, 0.5]) == pytest.approx(0.5)  # a flat curve's area is its value
    with pytest.raises(ValueError, match="expected as many"):
        curve_area([1, 2], [0.1])


def test_paired_difference_per_round_sees_what_the_raw_spread_hides() -> None:
    paired = paired_differences(records())
    assert set(paired) == {"ppal"}
    labeled, r0 = paired["ppal"][0]
    assert labeled == 20 and r0.mean == pytest.approx(0.0) and r0.low == pytest.approx(0.0)
    labeled, r1 = paired["ppal"][1]
    assert labeled == 40 and r1.n == 3 and r1.mean == pytest.approx(0.03)
    assert r1.high - r1.mean == pytest.approx(T2 * 0.01 / math.sqrt(3))
    assert r1.low > 0  # the seeds' 10-point spread cancels in the pairs
    assert paired["ppal"][2][1].mean == pytest.approx(0.05)
    assert paired_differences(records(), baseline="coreset") == {}


def test_only_seeds_both_strategies_ran_are_paired() -> None:
    recs = [r for r in records() if not (r.strategy == "ppal" and r.seed == 2)]
    r1 = paired_differences(recs)["ppal"][1][1]
    assert r1.n == 2 and r1.mean == pytest.approx(0.025)


def test_areas_and_their_paired_differences() -> None:
    area = areas(records())
    # random seed 0 over (20, 40, 60): ((0.1 + 0.2) / 2 · 20 + (0.2 + 0.3) / 2 · 20) / 40 = 0.2
    assert area["random"][0] == pytest.approx(0.2)
    paired = paired_areas(records())["ppal"]
    # per seed (2·d1 + d2) / 4: 0.02, 0.0275, 0.035
    assert paired.mean == pytest.approx(0.0275) and paired.n == 3
    assert paired.high - paired.mean == pytest.approx(T2 * 0.0075 / math.sqrt(3))


def test_gain_averaged_over_rounds_one_and_on() -> None:
    gain = paired_gain_over_rounds(records())["ppal"]
    assert gain.mean == pytest.approx(0.04) and gain.n == 3  # per seed 0.03, 0.04, 0.05
    assert gain.high - gain.mean == pytest.approx(T2 * 0.01 / math.sqrt(3))
    with_round0 = paired_gain_over_rounds(records(), first_round=0)["ppal"]
    assert with_round0.mean == pytest.approx(0.04 * 2 / 3)


def test_a_curve_cut_short_is_compared_on_its_common_part() -> None:
    recs = [r for r in records() if not (r.strategy == "ppal" and r.seed == 0 and r.round == 2)]
    # seed 0 integrates rounds 0..1 only: (0 + 0.02) / 2 = 0.01; seeds 1, 2 as before
    assert paired_areas(recs)["ppal"].mean == pytest.approx((0.01 + 0.0275 + 0.035) / 3)
    assert paired_gain_over_rounds(recs)["ppal"].mean == pytest.approx((0.02 + 0.04 + 0.05) / 3)


def test_gain_reliability_recovers_the_share_of_spread_that_is_the_batches_own() -> None:
    import numpy as np

    from magral_core.simulation.statistics import gain_reliability

    rng = np.random.default_rng(0)
    own = rng.normal(0.0, 1.0, 400)
    seed_shift = rng.normal(0.0, 5.0, 4)  # a seed's baseline moves every batch's gain alike: not noise here
    noisy = [[t + seed_shift[s] + rng.normal(0.0, 2.0) for s in range(4)] for t in own]
    out = gain_reliability(noisy)  # noise var 4 / 4 seeds = own var 1
    assert out["training_std"] == pytest.approx(2.0, rel=0.1)
    assert out["reliability"] == pytest.approx(0.5, abs=0.1)
    assert out["ceiling"] == pytest.approx(math.sqrt(out["reliability"]))
    assert out["seeds_for_0.8"] == pytest.approx(16, abs=5)  # 4 · noise var / own var
    pure_noise = [[rng.normal(0.0, 1.0) for _ in range(2)] for _ in range(400)]
    assert gain_reliability(pure_noise)["reliability"] < 0.15
    assert math.isnan(gain_reliability([[1.0], [2.0], [3.0]])["reliability"])  # one seed: no noise estimate


def test_round_zero_spread_measures_what_pairing_does_not_remove() -> None:
    exact = records()
    assert round_zero_spread(exact) == {s: {"spread": 0.0, "machines": [""]} for s in range(3)}
    moved = exact[:-3] + [RoundRecord("ppal", 2, r, 20 + 20 * r, v, v, {}, 0.0, {}, [], [], machine="b")
                          for r, v in enumerate([0.33, 0.44, 0.56])]
    spread = round_zero_spread(moved)
    assert spread[2]["spread"] == pytest.approx(0.03) and spread[2]["machines"] == ["", "b"]
    assert spread[0]["spread"] == 0.0
    assert round_zero_spread(curve("random", 0, [0.1, 0.2])) == {}  # one strategy: nothing to compare
