"""A label-budget forecast from the rounds so far: what the next labels are expected to buy.

Pure. The learning curve of a detector against its number of labeled images is modelled as a saturating
power law (learning curves of this shape are the usual fit in the data-scaling literature)::

    mAP(n) = a - b * (n / n_ref) ** (-c)        a = plateau, b >= 0, c > 0

`n_ref` is the smallest label count seen: it keeps `b` on the scale of the mAP gap so the fit is well
conditioned. With three or more distinct label counts the curve is fitted by least squares (scipy's
`curve_fit`, bounded); the band around the forecast is a 68% predictive interval (parameters drawn from the
fit's covariance plus the residual noise). With two it falls back to the straight line through the last two
rounds (no plateau); with fewer it says so. mAP is on the 0–1 scale throughout.

The forecast starts from where the curve is now: the expected mAP is the last round's mAP plus the fitted
curve's gain over the horizon (the fit's level at the last point is off by that round's noise, and a
learning curve's seeds differ by an offset more than by their slope). A fit that ends on a bound of its
parameters (plateau 0 or 1, exponent at either end of its range: a dip read as an abrupt plateau, a rise
read as a plateau of 1) is not used: the forecast then follows the least-squares line through the last
`recent` rounds, as it does with two label counts.

The verdict reads the gain of the next 100 labels as the smaller of the fitted curve's and the observed
one (the least-squares slope through the last `recent` rounds): a power law fitted to a whole curve that
saturates more abruptly than a power law (a sigmoid-like start, then a flat tail) keeps a rising tail and
would call a flat curve "still paying off"; the observed slope alone is noisy. The smaller of the two can
say "flattened" early on a noisy dip, never "paying off" on a tail that is flat in the data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

PAYING_OFF = "paying_off"
FLATTENED = "flattened"
TARGETS = (0.90, 0.95)
_C_BOUNDS = (0.01, 5.0)


@dataclass(frozen=True)
class PowerLaw:
    """`a - b * (n / n_ref) ** (-c)`; see the module docstring."""

    a: float
    b: float
    c: float
    n_ref: float

    def __call__(self, n: np.ndarray | float) -> np.ndarray:
        return _curve(np.asarray(n, np.float64) / self.n_ref, self.a, self.b, self.c)

    def labels_to_reach(self, fraction: float) -> float | None:
        """Labels at which the curve reaches `fraction` of its plateau `a` (0 < fraction < 1); None when the
        plateau is not positive. A curve with no gap left (b = 0) has reached it at any count: 0."""
        if self.a <= 0 or not 0 < fraction < 1:
            return None
        if self.b <= 0:
            return 0.0
        value = self.n_ref * (self.b / ((1 - fraction) * self.a)) ** (1 / self.c)
        return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Forecast:
    """What the rounds so far say about the next `horizon` labels.

    `method`: "power_law", "linear" (two label counts, or a fit that ended on a bound) or "none" (fewer).
    `expected_map`: mAP expected at `n_labeled + horizon`; `band`: its 68% interval (power law with more
    points than parameters only);
    `plateau`: the fitted `a`; `labels_to`: {"90%": labels, "95%": labels} to reach that share of the
    plateau; `gain_per_100`: the mAP the next 100 labels add at `n_labeled` (the smaller of
    `fitted_gain_per_100` and `recent_gain_per_100`, see the module docstring); `verdict`: PAYING_OFF or
    FLATTENED (gain below `flat_gain`), None without a gain; `message`: one plain sentence.
    """

    method: str
    n_labeled: int | None
    horizon: int
    flat_gain: float
    expected_map: float | None = None
    band: tuple[float, float] | None = None
    plateau: float | None = None
    labels_to: dict[str, int | None] = field(default_factory=dict)
    gain_per_100: float | None = None
    fitted_gain_per_100: float | None = None
    recent_gain_per_100: float | None = None
    verdict: str | None = None
    message: str = ""
    params: dict[str, float] | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "method": self.method,
            "n_labeled": self.n_labeled,
            "horizon": self.horizon,
            "expected_map": self.expected_map,
            "band": list(self.band) if self.band else None,
            "plateau": self.plateau,
            "labels_to": dict(self.labels_to),
            "gain_per_100": self.gain_per_100,
            "fitted_gain_per_100": self.fitted_gain_per_100,
            "recent_gain_per_100": self.recent_gain_per_100,
            "flat_gain": self.flat_gain,
            "verdict": self.verdict,
            "message": self.message,
            "params": self.params,
        }


def _curve(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a - b * np.power(x, -c)


def fit_power_law(
    labels: Sequence[float] | np.ndarray, maps: Sequence[float] | np.ndarray
) -> tuple[PowerLaw, np.ndarray, float]:
    """Least-squares power law through (labels, mAP); returns it, the (3, 3) covariance of (a, b, c)
    (infinite where the points do not determine it) and the residual standard deviation.

    Raises ValueError with fewer than 3 distinct label counts or a non-positive count; RuntimeError when
    the fit does not converge.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    n = np.asarray(labels, np.float64)
    y = np.asarray(maps, np.float64)
    if len(np.unique(n)) < 3:
        raise ValueError(f"expected at least 3 distinct label counts, found {len(np.unique(n))}")
    if (n <= 0).any():
        raise ValueError(f"expected positive label counts, found {n.min():g}")
    n_ref = float(n.min())
    a0 = float(min(1.0, y.max() + 0.05))
    b0 = float(max(a0 - y[np.argmin(n)], 1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)  # 3 points: the covariance is undefined, and said
        params, cov = curve_fit(
            _curve,
            n / n_ref,
            y,
            p0=(a0, b0, 0.5),
            bounds=((0.0, 0.0, _C_BOUNDS[0]), (1.0, np.inf, _C_BOUNDS[1])),
            maxfev=20000,
        )
    dof = len(n) - 3
    residual = y - _curve(n / n_ref, *params)
    sigma = float(np.sqrt((residual**2).sum() / dof)) if dof > 0 else math.inf
    law = PowerLaw(float(params[0]), float(params[1]), float(params[2]), n_ref)
    return law, np.asarray(cov, np.float64), sigma


def at_a_bound(law: PowerLaw) -> bool:
    """Whether the fit ended on a bound of its parameters (plateau 0 or 1, exponent at either end): the
    points did not determine it (a dip read as an abrupt plateau, a straight rise read as a plateau of 1),
    so neither its gain nor its covariance can be trusted."""
    def near(value: float, bound: float) -> bool:
        return abs(value - bound) <= 1e-6 * max(1.0, abs(bound))

    return near(law.a, 0.0) or near(law.a, 1.0) or near(law.c, _C_BOUNDS[0]) or near(law.c, _C_BOUNDS[1])


def _band(
    law: PowerLaw, cov: np.ndarray, sigma: float, now: float, at: float, level: float,
    rng: np.random.Generator, samples: int,
) -> tuple[float, float] | None:
    """68% band of `level` (the mAP now) plus the curve's gain from `now` to `at` under parameters drawn
    from the fit's covariance, plus the next round's own noise (the residual deviation)."""
    if not (np.isfinite(cov).all() and math.isfinite(sigma)):
        return None
    theta = rng.multivariate_normal([law.a, law.b, law.c], cov, size=samples, check_valid="ignore")
    a = np.clip(theta[:, 0], 0.0, 1.0)
    b = np.clip(theta[:, 1], 0.0, None)
    c = np.clip(theta[:, 2], *_C_BOUNDS)
    gains = (_curve(np.full(samples, at / law.n_ref), a, b, c)  # type: ignore[arg-type]
             - _curve(np.full(samples, now / law.n_ref), a, b, c))  # type: ignore[arg-type]
    draws = level + gains + rng.normal(0.0, sigma, samples)
    low, high = np.percentile(np.clip(draws, 0.0, 1.0), [16, 84])
    return round(float(low), 4), round(float(high), 4)


def _verdict(gain: float, flat_gain: float) -> tuple[str, str]:
    points = f"{100 * gain:+.2f} mAP points per 100 labels"
    if gain < flat_gain:
        return FLATTENED, f"labeling more has flattened: {points} (below {100 * flat_gain:.2f})"
    return PAYING_OFF, f"labeling more is still paying off: {points}"


def forecast(
    labels: Sequence[int],
    maps: Sequence[float | None],
    *,
    horizon: int,
    flat_gain: float,
    seed: int = 0,
    samples: int = 400,
    recent: int = 4,
    window: int | None = None,
) -> Forecast:
    """The forecast after `horizon` more labels from rounds (labels[i], maps[i]); rounds without an mAP
    (None, too few labels to validate on) are left out. The last round's label count is "now". The curve
    is fitted to the last `window` usable rounds (all when None); the observed gain is the slope through
    the last `recent` (>= 2)."""
    points = [(int(n), float(m)) for n, m in zip(labels, maps, strict=True) if m is not None and n > 0]
    if window is not None:
        points = points[-max(2, window):]
    now = points[-1][0] if points else (int(labels[-1]) if labels else None)
    base = Forecast("none", now, int(horizon), float(flat_gain))
    distinct = sorted({n for n, _ in points})
    if len(distinct) < 2:
        return replace(base, message="a forecast needs at least two rounds with a validation mAP")
    assert now is not None
    n = np.array([p[0] for p in points], np.float64)
    y = np.array([p[1] for p in points], np.float64)
    level = float(np.mean([m for n_, m in points if n_ == now]))  # the mAP now: the forecast's start
    tail = points[-max(2, recent):]
    xs, ys = [p[0] for p in tail], [p[1] for p in tail]
    if len(set(xs)) < 2:  # the last rounds share one label count: the line through the last two counts
        xs, ys = distinct[-2:], [float(np.mean([m for n_, m in points if n_ == d])) for d in distinct[-2:]]
    slope = float(np.polyfit(xs, ys, 1)[0])  # observed mAP per label over the last rounds
    if len(distinct) >= 3:
        try:
            law, cov, sigma = fit_power_law(n, y)
        except (RuntimeError, ValueError):
            law = None
        if law is not None and not at_a_bound(law):
            fitted = float(law(now + 100) - law(now))
            gain = min(fitted, 100 * slope)
            verdict, message = _verdict(gain, flat_gain)
            reach = {f"{round(100 * q)}%": law.labels_to_reach(q) for q in TARGETS}
            return replace(
                base,
                method="power_law",
                expected_map=round(float(np.clip(level + law(now + horizon) - law(now), 0.0, 1.0)), 4),
                band=_band(law, cov, sigma, now, now + horizon, level, np.random.default_rng(seed), samples),
                plateau=round(law.a, 4),
                labels_to={k: (math.ceil(v) if v is not None else None) for k, v in reach.items()},
                gain_per_100=round(gain, 5),
                fitted_gain_per_100=round(fitted, 5),
                recent_gain_per_100=round(100 * slope, 5),
                verdict=verdict,
                message=message,
                params={"a": law.a, "b": law.b, "c": law.c, "n_ref": law.n_ref},
            )
    # two label counts, a fit that failed or one the points did not determine: the observed slope
    verdict, message = _verdict(100 * slope, flat_gain)
    return replace(
        base,
        method="linear",
        expected_map=round(float(np.clip(level + slope * horizon, 0.0, 1.0)), 4),
        gain_per_100=round(100 * slope, 5),
        recent_gain_per_100=round(100 * slope, 5),
        verdict=verdict,
        message=message + f" (straight line through the last {len(set(xs))} rounds: no plateau fitted)",
    )
