"""The training schedule chosen by the data: a step budget that grows with the labeled set within bounds, and
early stopping by a validation score that keeps the best state seen.

Pure rules, no torch: `engine.train_detector` applies them, `engine.fit_detector` reads their settings from
the configuration so that rounds, `magral train` and the simulator follow the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepBudget:
    """`steps(n) = clip(ceil(steps_per_image * n), min_steps, max_steps)` optimiser steps for `n` images.

    Small labeled sets get `min_steps` (a fixed epoch count would give a 20-image set 50 steps at batch 4,
    too few to fit the heads), large ones at most `max_steps` (a bound on a round's training time).
    """

    steps_per_image: float
    min_steps: int
    max_steps: int

    def __post_init__(self) -> None:
        if self.steps_per_image <= 0:
            raise ValueError(f"steps_per_image must be > 0, found {self.steps_per_image}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, found {self.min_steps}, {self.max_steps}")

    def steps(self, images: int) -> int:
        """The step budget for `images` training images (>= 1)."""
        if images < 1:
            raise ValueError(f"images must be >= 1, found {images}")
        return min(self.max_steps, max(self.min_steps, math.ceil(self.steps_per_image * images)))


class BestKeeper:
    """Early stopping by a validation score (higher is better): `update(step, score)` says whether the
    score is a new best (the caller then keeps its state); `stop` turns true after `patience` evaluations
    in a row without a gain of more than `min_delta` over the best. `patience` 0 never stops early.

    Ties keep the earlier state: a later evaluation must beat the best by more than `min_delta`.
    """

    def __init__(self, patience: int = 0, min_delta: float = 0.0) -> None:
        if patience < 0 or min_delta < 0:
            raise ValueError(f"patience and min_delta must be >= 0, found {patience}, {min_delta}")
        self.patience = patience
        self.min_delta = min_delta
        self.best_score = -math.inf
        self.best_step = -1
        self.history: list[tuple[int, float]] = []
        self._since_best = 0

    def update(self, step: int, score: float) -> bool:
        """Record the score at `step`; True when it is the new best. A NaN score is never the best."""
        self.history.append((step, score))
        if not math.isnan(score) and score > self.best_score + self.min_delta:
            self.best_score, self.best_step, self._since_best = score, step, 0
            return True
        self._since_best += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self._since_best >= self.patience


def evaluation_steps(total: int, every: int) -> list[int]:
    """The steps (1-based counts of steps done) after which the validation score is computed: every
    `every` steps and always after the last one; none when `every` is 0."""
    if every < 0 or total < 1:
        raise ValueError(f"need every >= 0 and total >= 1, found {every}, {total}")
    if every == 0:
        return []
    return sorted({*range(every, total + 1, every), total})
