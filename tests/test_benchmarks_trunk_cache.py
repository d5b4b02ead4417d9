"""The trunk-cache benchmark's figures on made-up curves: per-component seconds, their ratios, the table."""

from __future__ import annotations

import pytest

from benchmarks.trunk_cache import analyse, markdown
from magral_core.simulation.protocol import RoundRecord


def curve(values: list[float], train: float, evaluate: float) -> list[RoundRecord]:
    return [RoundRecord("random", 0, r, 20 + 20 * r, v, v, {}, train + evaluate + 10.0,
                        {"train": train, "evaluate": evaluate, "features": 10.0}, [], [1] if r < 2 else [])
            for r, v in enumerate(values)]


def test_the_cached_curve_is_paired_with_the_computed_one_and_timed_per_part() -> None:
    result = analyse(curve([0.1, 0.2, 0.3], 100.0, 20.0), curve([0.1, 0.25, 0.3], 80.0, 10.0), "random")
    assert result["per_round"]["1"]["mean"] == pytest.approx(0.05)
    assert result["computed"]["component_seconds"]["0"] == {"train": 300.0, "evaluate": 60.0,
                                                            "features": 30.0}
    ratio = result["ratio"]["0"]
    assert ratio["train"] == pytest.approx(0.8) and ratio["evaluate"] == pytest.approx(0.5)
    assert ratio["features"] == pytest.approx(1.0) and ratio["curve"] == pytest.approx(300 / 390)
    table = markdown(result)
    assert "| 0 | train | 300 | 240 | 0.80 |" in table and "| 0 | curve | 390 | 300 | 0.77 |" in table
