"""MAGRAL's fit between its two stages of records, saved and loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from magral_core.errors import DataError
from magral_core.method.policy_training import TrainingSettings
from magral_core.method.strategies import MagralSettings, begin_fit
from magral_core.method.strategies.magral_state import load_fit, save_fit


def test_magral_fit_saved_between_its_stages_round_trips(tmp_path: Path) -> None:
    features = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    settings = MagralSettings(records=6, training=TrainingSettings(updates=4, rollouts=2))

    def proxy(indices: np.ndarray, seed: int) -> float:
        return float(np.sum(indices)) / 100.0

    fit = begin_fit(features, 3, proxy, settings, seed=1)
    save_fit(tmp_path / "fit.pt", fit)
    loaded = load_fit(tmp_path / "fit.pt")
    assert loaded.pending == fit.pending and len(fit.pending) == 3
    assert loaded.rng.bit_generator.state == fit.rng.bit_generator.state
    assert [r.value for r in loaded.report.records] == [r.value for r in fit.report.records]
    assert loaded.report.estimator == fit.report.estimator
    assert np.allclose(loaded.controller.scores(features, 3), fit.controller.scores(features, 3))
    (tmp_path / "bad.pt").write_bytes(b"not a fit")
    with pytest.raises(DataError, match=r"bad\.pt"):
        load_fit(tmp_path / "bad.pt")

