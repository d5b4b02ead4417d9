"""Paired statistics of active-learning curves: what a strategy gains over a baseline run under the same seed.

Every strategy's curve under seed s starts from the same initial labeled set and the same round-0 model as
the baseline's curve under seed s, so a strategy is compared with the baseline seed by seed: the paired
difference d_s = metric(strategy, s) − metric(baseline, s), summarised by its mean and a Student-t 95%
interval over seeds (mean ± t₀.₉₇₅,ₙ₋₁ · sd / √n, sd with n − 1 degrees of freedom). Pairing removes the
between-seed spread of the initial set, which is most of the spread of the raw curves.

The area under a curve is the trapezoid integral of the metric over labeled images divided by the labeled
range, i.e. the curve's mean metric per label, in the metric's own units; a one-point curve's area is its
value. `gain_reliability` says how far per-batch gains measured over a few training seeds can rank batches
at all. Pure functions over `RoundRecord`s and arrays; nothing here reads or writes files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from magral_core.simulation.protocol import RoundRecord


@dataclass(frozen=True)
class Interval:
    """Mean and two-sided confidence interval of `n` values; low = high = nan when n < 2."""

    mean: float
    low: float
    high: float
    n: int


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of `values` (nan mean for no values). Raises ValueError for a
    confidence outside (0, 1)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), found {confidence}")
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def curve_area(n_labeled: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under (n_labeled, values), points sorted by n_labeled, divided by the labeled range;
    the single value for a one-point curve. Raises ValueError for no points or unequal lengths."""
    x = np.asarray(n_labeled, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"expected as many values as labeled counts (>= 1), found {len(y)} and {len(x)}")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if x[-1] == x[0]:
        return float(y.mean())
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / (x[-1] - x[0]))


def _curves(records: Sequence[RoundRecord]) -> dict[str, dict[int, dict[int, RoundRecord]]]:
    """{strategy: {seed: {round: record}}}."""
    out: dict[str, dict[int, dict[int, RoundRecord]]] = {}
    for rec in records:
        out.setdefault(rec.strategy, {}).setdefault(rec.seed, {})[rec.round] = rec
    return out


def _value(rec: RoundRecord, metric: str) -> float:
    return float(getattr(rec, metric))


def paired_differences(
    records: Sequence[RoundRecord], baseline: str = "random", *, metric: str = "map", confidence: float = 0.95
) -> dict[str, dict[int, tuple[float, Interval]]]:
    """{strategy: {round: (mean labeled count, interval of strategy − baseline over the seeds both ran)}}
    for every strategy but the baseline; {} when the baseline did not run."""
    curves = _curves(records)
    base = curves.get(baseline)
    if base is None:
        return {}
    out: dict[str, dict[int, tuple[float, Interval]]] = {}
    for name, seeds in sorted(curves.items()):
        if name == baseline:
            continue
        rounds = sorted({r for s in seeds.values() for r in s})
        out[name] = {}
        for r in rounds:
            pairs = [(seeds[s][r], base[s][r]) for s in sorted(seeds)
                     if r in seeds[s] and r in base.get(s, {})]
            if pairs:
                diffs = [_value(a, metric) - _value(b, metric) for a, b in pairs]
                labeled = float(np.mean([a.n_labeled for a, _ in pairs]))
                out[name][r] = (labeled, t_interval(diffs, confidence))
    return out


def areas(records: Sequence[RoundRecord], *, metric: str = "map") -> dict[str, dict[int, float]]:
    """{strategy: {seed: `curve_area` of that curve}}."""
    out: dict[str, dict[int, float]] = {}
    for name, seeds in sorted(_curves(records).items()):
        out[name] = {}
        for seed, rounds in sorted(seeds.items()):
            recs = [rounds[r] for r in sorted(rounds)]
            out[name][seed] = curve_area([x.n_labeled for x in recs], [_value(x, metric) for x in recs])
    return out


def _paired(
    records: Sequence[RoundRecord],
    baseline: str,
    difference: Callable[[dict[int, RoundRecord], dict[int, RoundRecord], list[int]], float],
    *,
    first_round: int,
    confidence: float,
) -> dict[str, Interval]:
    """{strategy: interval over seeds of `difference(strategy's rounds, baseline's rounds, common rounds)`},
    over the rounds >= `first_round` both curves of a seed reached (a curve cut short by a killed run is
    compared on its common part); seeds with no common round are left out."""
    curves = _curves(records)
    base = curves.get(baseline)
    if base is None:
        return {}
    out: dict[str, Interval] = {}
    for name, seeds in sorted(curves.items()):
        if name == baseline:
            continue
        per_seed = []
        for seed in sorted(set(seeds) & set(base)):
            common = sorted(r for r in set(seeds[seed]) & set(base[seed]) if r >= first_round)
            if common:
                per_seed.append(difference(seeds[seed], base[seed], common))
        out[name] = t_interval(per_seed, confidence)
    return out


def paired_areas(
    records: Sequence[RoundRecord], baseline: str = "random", *, metric: str = "map", confidence: float = 0.95
) -> dict[str, Interval]:
    """{strategy: interval of area(strategy, s) − area(baseline, s) over the seeds both ran} for every
    strategy but the baseline, integrated over the rounds both curves of a seed reached."""

    def area(curve: dict[int, RoundRecord], rounds: list[int]) -> float:
        return curve_area([curve[r].n_labeled for r in rounds], [_value(curve[r], metric) for r in rounds])

    return _paired(records, baseline, lambda a, b, rounds: area(a, rounds) - area(b, rounds),
                   first_round=0, confidence=confidence)


def paired_gain_over_rounds(
    records: Sequence[RoundRecord],
    baseline: str = "random",
    *,
    first_round: int = 1,
    metric: str = "map",
    confidence: float = 0.95,
) -> dict[str, Interval]:
    """{strategy: interval over seeds of the mean over rounds >= `first_round` (those both curves of the
    seed reached) of strategy − baseline}. Round 0 is left out by default: it is the same model for every
    strategy, so its difference is 0 by construction."""

    def gain(a: dict[int, RoundRecord], b: dict[int, RoundRecord], rounds: list[int]) -> float:
        return float(np.mean([_value(a[r], metric) - _value(b[r], metric) for r in rounds]))

    return _paired(records, baseline, gain, first_round=first_round, confidence=confidence)


def round_zero_spread(records: Sequence[RoundRecord], *, metric: str = "map") -> dict[int, dict[str, Any]]:
    """{seed: {"spread": max − min of round 0's metric over the strategies that ran the seed, "machines":
    the distinct `RoundRecord.machine`s of the seed's records}} for seeds run by two strategies or more.
    Round 0 trains the same initial set with the same seed for every strategy, so its spread is 0 on a
    reproducible run; a nonzero spread (curves resumed on another machine, or nondeterministic kernels) is
    noise that the paired differences of that seed carry beyond the seeds' own."""
    out: dict[int, dict[str, Any]] = {}
    curves = _curves(records)
    for seed in sorted({rec.seed for rec in records}):
        first = [rounds[seed][0] for rounds in curves.values() if 0 in rounds.get(seed, {})]
        if len(first) < 2:
            continue
        values = [_value(rec, metric) for rec in first]
        machines = sorted({rec.machine for rounds in curves.values()
                           for rec in rounds.get(seed, {}).values()})
        out[seed] = {"spread": max(values) - min(values), "machines": machines}
    return out


def policy_response_by_round(records: Sequence[RoundRecord]) -> dict[str, dict[int, dict[str, float]]]:
    """{strategy: {round: mean over seeds of each numeric diagnostic}} for rounds whose strategy recorded
    diagnostics (MAGRAL: overlaps with the untrained and the permuted-reward controller's batches)."""
    grouped: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in records:
        if r.diagnostics:
            grouped.setdefault(r.strategy, {}).setdefault(r.round, []).append(r.diagnostics)
    return {
        name: {
            rnd: {key: float(np.mean([d[key] for d in ds])) for key in ds[0]
                  if all(isinstance(d.get(key), int | float) for d in ds)} | {"seeds": float(len(ds))}
            for rnd, ds in sorted(rounds.items())
        }
        for name, rounds in sorted(grouped.items())
    }


def gain_reliability(pairs: Sequence[Sequence[float]]) -> dict[str, float]:
    """How much of the spread of per-batch mean gains is the batches' own and not the training seeds'.

    `pairs`: per batch, its real gain under each of the same n training seeds (batches with fewer seeds are
    left out). Two-way model gain[k, s] = μ + batch_k + seed_s + ε: a seed's common shift (its baseline
    training, shared by all batches) is removed, the residual variance σ² = Σ ε² / ((K − 1)(n − 1)) is one
    training's noise, and the batch means' observed variance V holds σ²/n of it; reliability
    R = max(0, V − σ²/n) / V. No estimator's correlation with the measured gains can exceed about √R
    ("ceiling"); `seeds_for_0.8` is the seed count that would make R = 0.8 at the estimated spreads (inf when
    the batch means spread no more than the noise predicts)."""
    nan = {"training_std": float("nan"), "reliability": float("nan"), "ceiling": float("nan"),
           "seeds_for_0.8": float("nan")}
    lengths = [len(v) for v in pairs]
    n = max(lengths, default=0)
    rows = [np.asarray(v, float) for v in pairs if len(v) == n]
    if n < 2 or len(rows) < 3:
        return nan
    values = np.stack(rows)
    k = len(values)
    residual = (values - values.mean(axis=1, keepdims=True) - values.mean(axis=0, keepdims=True)
                + values.mean())
    noise_var = float((residual**2).sum() / ((k - 1) * (n - 1)))
    observed = float(values.mean(axis=1).var(ddof=1))
    own = max(0.0, observed - noise_var / n)
    r = own / observed if observed > 0 else 0.0
    return {"training_std": float(np.sqrt(noise_var)), "reliability": r, "ceiling": float(np.sqrt(r)),
            "seeds_for_0.8": float(np.ceil(4 * noise_var / own)) if own > 0 else float("inf")}
