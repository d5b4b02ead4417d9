"""The random baseline: a uniformly random permutation of the pool."""

from __future__ import annotations

import numpy as np

from magral_core.method.strategies.base import Pick, Pool, check_budget


class RandomStrategy:
    """Uniformly random ranking; priority is 1 - rank / N so that earlier picks have higher priority."""

    name = "random"

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> list[Pick]:
        check_budget(pool, budget)
        n = len(pool)
        order = rng.permutation(n)
        return [Pick(int(i), 1.0 - r / max(n, 1), f"random (rank {r + 1})") for r, i in enumerate(order)]
