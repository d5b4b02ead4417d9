"""The step budget's bounds, early stopping on known score sequences, and when validation runs."""

from __future__ import annotations

import math

import pytest

from magral_core.vision.schedule import BestKeeper, StepBudget, evaluation_steps


def test_step_budget_scales_with_images_within_bounds() -> None:
    budget = StepBudget(steps_per_image=2.5, min_steps=300, max_steps=1000)
    assert budget.steps(1) == 300 and budget.steps(20) == 300  # 50 would be too few
    assert budget.steps(121) == 303  # ceil(302.5)
    assert budget.steps(205) == 513
    assert budget.steps(400) == 1000 and budget.steps(10_000) == 1000
    with pytest.raises(ValueError, match="images"):
        budget.steps(0)


@pytest.mark.parametrize("args", [(0.0, 1, 2), (1.0, 0, 2), (1.0, 3, 2)])
def test_step_budget_refuses_bad_bounds(args: tuple[float, int, int]) -> None:
    with pytest.raises(ValueError):
        StepBudget(*args)


def test_keeper_keeps_the_best_and_stops_after_patience() -> None:
    keeper = BestKeeper(patience=2)
    improved = [keeper.update(step, score) for step, score in
                [(50, 0.10), (100, 0.30), (150, 0.25), (200, 0.30)]]
    assert improved == [True, True, False, False]  # a tie does not replace the earlier state
    assert keeper.best_step == 100 and keeper.best_score == 0.30 and keeper.stop
    assert keeper.history == [(50, 0.10), (100, 0.30), (150, 0.25), (200, 0.30)]


def test_keeper_resets_patience_on_a_gain_and_never_stops_without_patience() -> None:
    keeper = BestKeeper(patience=2)
    for step, score in [(1, 0.2), (2, 0.1), (3, 0.3), (4, 0.2)]:
        keeper.update(step, score)
    assert not keeper.stop and keeper.best_step == 3
    patient = BestKeeper(patience=0)
    for step in range(1, 20):
        patient.update(step, 1.0 / step)
    assert not patient.stop and patient.best_step == 1


def test_keeper_ignores_nan_and_honours_min_delta() -> None:
    keeper = BestKeeper(min_delta=0.05)
    assert not keeper.update(1, math.nan) and keeper.best_step == -1
    assert keeper.update(2, 0.10) and not keeper.update(3, 0.14) and keeper.update(4, 0.16)
    assert keeper.best_step == 4


def test_evaluation_steps_include_the_last() -> None:
    assert evaluation_steps(300, 50) == [50, 100, 150, 200, 250, 300]
    assert evaluation_steps(120, 50) == [50, 100, 120]
    assert evaluation_steps(30, 50) == [30]
    assert evaluation_steps(300, 0) == []
