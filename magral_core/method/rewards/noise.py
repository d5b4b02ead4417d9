"""Noise control of any reward (`RewardFn`): common random numbers, several seeds, paired differences.

[ours] A record's value moves with its training seed about as much as between batches (issue 8). Three
cheap remedies, composable: `common_seed` replaces the record's seed by the round's, so every record of a
round sees the same initialisation and data order and differences between records are due to their batches
only; `seeds` averages over that many consecutive seeds; `paired` reports each value as the difference to
the reference (the empty batch) under the same seed, so the seed's shared offset cancels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RewardFn = Callable[[np.ndarray, int], float]
"""`evaluate(indices, seed) -> value`: indices are positions in the round's unlabeled pool."""


class NoiseControlled:
    """`evaluate(indices, seed)` = mean over s in seeds of reward(indices, s) [− reward(∅, s) if paired]."""

    def __init__(self, reward: RewardFn, *, seeds: int = 1, paired: bool = True,
                 common_seed: int | None = None) -> None:
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, found {seeds}")
        self.reward, self.seeds, self.paired, self.common_seed = reward, seeds, paired, common_seed
        self._reference: dict[int, float] = {}

    def reference(self, seed: int) -> float:
        """reward(∅, seed), computed once per seed."""
        if seed not in self._reference:
            self._reference[seed] = self.reward(np.zeros(0, np.int64), seed)
        return self._reference[seed]

    def __call__(self, indices: np.ndarray, seed: int) -> float:
        first = seed if self.common_seed is None else self.common_seed
        values = []
        for s in range(first, first + self.seeds):
            value = self.reward(np.asarray(indices, dtype=np.int64), s)
            values.append(value - self.reference(s) if self.paired else value)
        return float(np.mean(values))

    evaluate = __call__
