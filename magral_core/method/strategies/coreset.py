"""Core-set baseline: k-center greedy on the cached embeddings (Sener & Savarese, 2018).

Starting from the labeled embeddings as centres, repeatedly pick the pool image farthest (L2) from every
centre so far and make it a centre. The greedy order is the ranking for the first `greedy_picks` images
(default: the budget); the images after that are ranked by their distance to the nearest centre once the
greedy picks are made, which is what the next greedy steps would look at first and costs no more passes.
With no labeled images the first pick is the image farthest from the pool mean.
"""

from __future__ import annotations

import numpy as np

from magral_core.method.strategies.base import Pick, Pool, check_budget


def _sq_dist(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(N,) squared L2 distance of each row of x to its nearest row of `centres` (M >= 1)."""
    best = np.full(len(x), np.inf)
    x_sq = (x * x).sum(1)
    for start in range(0, len(centres), 1024):  # chunks bound memory at N × 1024
        c = centres[start : start + 1024]
        d = x_sq[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
        best = np.minimum(best, d.min(axis=1))
    return np.maximum(best, 0.0)


def k_center_greedy(
    embeddings: np.ndarray, labeled: np.ndarray, picks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy k-center order.

    Returns (order (picks,), distance of each pick to its nearest centre when picked (picks,), final
    distance to the nearest centre of every point (N,), 0 for picked points).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if len(labeled):
        dist = _sq_dist(x, np.asarray(labeled, dtype=np.float64))
    else:
        dist = _sq_dist(x, x.mean(axis=0, keepdims=True))
    order = np.empty(picks, dtype=np.int64)
    gains = np.empty(picks)
    for k in range(picks):
        i = int(np.argmax(dist))
        order[k], gains[k] = i, dist[i]
        dist = np.minimum(dist, ((x - x[i]) ** 2).sum(1))
        dist[i] = -1.0  # never picked twice, even among duplicates
    return order, np.sqrt(np.maximum(gains, 0.0)), np.sqrt(np.maximum(dist, 0.0))


class CoresetStrategy:
    """k-center greedy ranking (see module docstring)."""

    name = "coreset"

    def __init__(self, greedy_picks: int | None = None) -> None:
        self.greedy_picks = greedy_picks

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> list[Pick]:
        batch = check_budget(pool, budget)
        picks = min(len(pool), self.greedy_picks or batch)
        order, gains, rest = k_center_greedy(pool.embeddings, pool.labeled_embeddings, picks)
        out = [Pick(int(i), float(g), f"core-set distance {g:.3g} (rank {r + 1})")
               for r, (i, g) in enumerate(zip(order, gains, strict=True))]
        chosen = set(order.tolist())
        remaining = np.array([i for i in range(len(pool)) if i not in chosen], dtype=np.int64)
        tiebreak = rng.random(len(remaining))
        for r, i in enumerate(remaining[np.lexsort((tiebreak, -rest[remaining]))], start=picks + 1):
            out.append(Pick(int(i), float(rest[i]), f"core-set distance {rest[i]:.3g} (rank {r})"))
        return out
