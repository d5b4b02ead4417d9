"""Candidate subsets [ours]: which unlabeled images a round scores and ranks when the pool is large.

Pure. Scoring and ranking every unlabeled image makes a round's cost grow with the pool. Above a pool size
(`Config.candidates_above`) a round works on a candidate subset instead, as large-scale active learning does:
a seeded random sample of `factor · budget` unlabeled images, topped up with the previous round's
best-ranked images that are still unlabeled (the round labels its first `budget`; those ranked next are
the strongest candidates the last model found). The subset's size does not grow with the pool, so neither
does the cost of a round's scoring, ranking and predictions; listing the project's tasks still does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CandidateRule:
    """`above`: pools of at most this many images are ranked whole; `factor`: the random sample holds
    `factor · budget` images; `carry`: at most this many of the previous round's best-ranked images are
    added to it."""

    above: int
    factor: int
    carry: int

    def __post_init__(self) -> None:
        if self.above < 0 or self.factor < 1 or self.carry < 0:
            raise ValueError(
                f"candidate rule: expected above >= 0, factor >= 1, carry >= 0; found above={self.above}, "
                f"factor={self.factor}, carry={self.carry}"
            )

    def applies(self, pool_size: int) -> bool:
        """Whether a pool of `pool_size` unlabeled images is ranked through a candidate subset."""
        return pool_size > self.above


def candidate_positions(
    pool_size: int, budget: int, rule: CandidateRule, carried: Sequence[int], seed: int | Sequence[int]
) -> np.ndarray:
    """Sorted positions (in a pool of `pool_size`) of the round's candidates: every position when the rule
    does not apply; else the first `rule.carry` distinct positions of `carried` (best first; positions
    outside the pool are ignored) plus a random sample, seeded by `seed`, of `rule.factor · budget` of the
    others (all of them when fewer remain).

    Raises ValueError for budget < 1.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, found {budget}")
    if not rule.applies(pool_size):
        return np.arange(pool_size, dtype=np.int64)
    kept: list[int] = []
    seen: set[int] = set()
    for position in carried:
        p = int(position)
        if len(kept) == rule.carry:
            break
        if 0 <= p < pool_size and p not in seen:
            kept.append(p)
            seen.add(p)
    others = np.setdiff1d(np.arange(pool_size, dtype=np.int64), np.asarray(kept, dtype=np.int64))
    draw = min(len(others), rule.factor * budget)
    sample = np.random.default_rng(seed).choice(others, size=draw, replace=False) if draw else others[:0]
    return np.sort(np.concatenate([np.asarray(kept, dtype=np.int64), sample.astype(np.int64)]))
