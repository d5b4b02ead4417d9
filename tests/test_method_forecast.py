"""The label-budget forecast: known answers on made-up power-law curves, few points, a flat curve."""

from __future__ import annotations

import numpy as np
import pytest

from magral_core.method.forecast import FLATTENED, PAYING_OFF, PowerLaw, fit_power_law, forecast


def curve(n: np.ndarray) -> np.ndarray:
    """mAP(n) = 0.6 - 2 n^-0.6: 0.27 at 20 labels, 0.545 at 400, 0.568 at 1,000."""
    return 0.6 - 2.0 * n**-0.6


def test_fit_recovers_a_known_power_law() -> None:
    n = np.arange(20, 420, 40, dtype=np.float64)
    law, cov, sigma = fit_power_law(n, curve(n))
    assert law.a == pytest.approx(0.6, abs=1e-4) and law.c == pytest.approx(0.6, abs=1e-3)
    # b is on the n_ref scale: 2 * 20^-0.6
    assert law.n_ref == 20 and law.b == pytest.approx(2.0 * 20**-0.6, rel=1e-3)
    assert sigma < 1e-6 and cov.shape == (3, 3)


def test_labels_to_reach_a_share_of_the_plateau() -> None:
    law = PowerLaw(a=0.6, b=2.0, c=0.6, n_ref=1.0)
    # 0.6 - 2 n^-0.6 = 0.9 * 0.6  <=>  n = (2 / 0.06)^(1/0.6)
    assert law.labels_to_reach(0.9) == pytest.approx((2.0 / 0.06) ** (1 / 0.6))
    assert law.labels_to_reach(0.95) == pytest.approx((2.0 / 0.03) ** (1 / 0.6))
    assert PowerLaw(0.5, 0.0, 0.5, 10.0).labels_to_reach(0.9) == 0.0
    assert PowerLaw(0.0, 1.0, 0.5, 10.0).labels_to_reach(0.9) is None


def test_forecast_on_a_noisy_saturating_curve() -> None:
    rng = np.random.default_rng(0)
    n = np.arange(20, 420, 40, dtype=np.float64)
    maps = curve(n) + rng.normal(0, 0.003, len(n))
    result = forecast(list(n.astype(int)), list(maps), horizon=40, flat_gain=0.005)
    assert result.method == "power_law" and result.n_labeled == 380
    assert result.expected_map == pytest.approx(float(curve(np.array(420.0))), abs=0.01)
    assert result.band is not None and result.band[0] < result.expected_map < result.band[1]
    assert result.plateau == pytest.approx(0.6, abs=0.03)
    assert result.labels_to["90%"] is not None and result.labels_to["95%"] is not None
    assert result.labels_to["90%"] < result.labels_to["95%"]
    assert result.to_json()["verdict"] == result.verdict


def test_verdict_is_flattened_at_the_end_of_a_saturating_curve_not_at_its_start() -> None:
    n = np.arange(20, 1120, 60, dtype=np.float64)
    maps = curve(n)
    start = forecast(list(n[:5].astype(int)), list(maps[:5]), horizon=20, flat_gain=0.005)
    end = forecast(list(n.astype(int)), list(maps), horizon=20, flat_gain=0.005)
    assert start.verdict == PAYING_OFF and "paying off" in start.message
    assert end.verdict == FLATTENED and "flattened" in end.message
    # the gain of the next 100 labels at the last round (1,100 labels)
    assert end.n_labeled == 1100
    gain = float(curve(np.array(1200.0)) - curve(np.array(1100.0)))
    assert end.gain_per_100 == pytest.approx(gain, rel=0.01)


def test_a_flat_curve_has_flattened() -> None:
    result = forecast([20, 40, 60, 80], [0.3, 0.3, 0.3, 0.3], horizon=20, flat_gain=0.005)
    assert result.verdict == FLATTENED and result.expected_map == pytest.approx(0.3, abs=1e-6)
    assert result.gain_per_100 == pytest.approx(0.0, abs=1e-6)


def test_two_rounds_give_a_straight_line_and_fewer_give_none() -> None:
    line = forecast([20, 40], [0.2, 0.3], horizon=20, flat_gain=0.005)
    assert line.method == "linear" and line.expected_map == pytest.approx(0.4)
    assert line.gain_per_100 == pytest.approx(0.5) and line.plateau is None and line.band is None
    assert forecast([20], [0.2], horizon=20, flat_gain=0.005).method == "none"
    assert forecast([], [], horizon=20, flat_gain=0.005).n_labeled is None
    # rounds without a validation mAP are left out
    skipped = forecast([5, 20, 40], [None, 0.2, 0.3], horizon=20, flat_gain=0.005)
    assert skipped.method == "linear" and skipped.n_labeled == 40


def test_three_points_fit_exactly_without_a_band() -> None:
    n = np.array([20.0, 60.0, 140.0])
    result = forecast(list(n.astype(int)), list(curve(n)), horizon=20, flat_gain=0.005)
    assert result.method == "power_law" and result.band is None
    assert result.expected_map == pytest.approx(float(curve(np.array(160.0))), abs=0.005)


def test_a_flat_tail_after_a_steep_rise_has_flattened() -> None:
    # 1 - exp saturation (sharper than a power law): the whole-curve fit keeps rising, the data do not
    n = np.arange(10, 140, 10, dtype=np.float64)
    maps = 0.54 * (1 - np.exp(-n / 15)) + 0.002 * np.cos(n)
    result = forecast(list(n.astype(int)), list(maps), horizon=10, flat_gain=0.005)
    assert result.fitted_gain_per_100 is not None and result.fitted_gain_per_100 > 0.005
    assert result.recent_gain_per_100 is not None and abs(result.recent_gain_per_100) < 0.005
    assert result.verdict == FLATTENED
    early = forecast(list(n[:4].astype(int)), list(maps[:4]), horizon=10, flat_gain=0.005)
    assert early.verdict == PAYING_OFF


def test_window_fits_only_the_last_rounds() -> None:
    n = np.arange(20, 420, 40, dtype=np.float64)
    result = forecast(list(n.astype(int)), list(curve(n)), horizon=40, flat_gain=0.005, window=4)
    assert result.params is not None and result.params["n_ref"] == 260
    assert result.expected_map == pytest.approx(float(curve(np.array(420.0))), abs=1e-3)


def test_a_dip_at_the_start_is_not_read_as_a_plateau() -> None:
    # the third round below the second: the exact power law through them is an abrupt plateau (exponent on
    # its bound), which would say "flattened" after 3 rounds of a curve rising at 0.1 mAP per 100 labels
    result = forecast([20, 60, 100], [0.143, 0.246, 0.219], horizon=40, flat_gain=0.005)
    assert result.method == "linear" and result.verdict == PAYING_OFF
    slope = float(np.polyfit([20, 60, 100], [0.143, 0.246, 0.219], 1)[0])
    assert result.gain_per_100 == pytest.approx(100 * slope, abs=1e-5)
    assert result.expected_map == pytest.approx(0.219 + 40 * slope, abs=1e-4)  # from the mAP now


def test_the_forecast_starts_from_the_last_round() -> None:
    # the same curve shifted at its last round only: the forecast moves with it, by the same amount
    n = np.arange(20, 420, 40, dtype=np.float64)
    maps = curve(n)
    shifted = maps.copy()
    shifted[-1] += 0.004
    base = forecast(list(n.astype(int)), list(maps), horizon=40, flat_gain=0.005)
    moved = forecast(list(n.astype(int)), list(shifted), horizon=40, flat_gain=0.005)
    assert base.method == moved.method == "power_law"
    assert base.expected_map is not None and moved.expected_map is not None
    assert moved.expected_map - shifted[-1] == pytest.approx(base.expected_map - maps[-1], abs=2e-3)
    assert moved.band is not None and moved.band[0] < moved.expected_map < moved.band[1]
