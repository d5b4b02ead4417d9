"""Uncertainty baselines: a per-detection uncertainty, aggregated over an image's detections.

Per detection, from its class distribution p (`features.class_distributions`: the full softmax with the
background column when the detector gives `class_probs`, else (score, 1 - score)):

- `entropy`: -Σ p log p (nats);
- `least_confidence`: 1 - max p;
- `margin`: 1 - (p₍₁₎ - p₍₂₎), one minus the gap between the two largest probabilities.

All three grow with uncertainty. Aggregation over the image's detections: `max`, `mean` or `sum`.
An image with no detections scores 0 under every measure and aggregation: the detector found nothing it is
unsure about, so it is ranked after every image with an uncertain detection (ties broken at random).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from magral_core.method.features import class_distributions, entropy
from magral_core.method.strategies.base import Pick, Pool, check_budget, ranking
from magral_core.structures import Detections


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """1 - max p per row."""
    return 1.0 - np.asarray(probs, dtype=np.float64).max(axis=-1)


def margin(probs: np.ndarray) -> np.ndarray:
    """1 - (largest - second largest) per row; a single-column row has margin 0 (no alternative)."""
    p = np.sort(np.asarray(probs, dtype=np.float64), axis=-1)
    if p.shape[-1] < 2:
        return np.zeros(p.shape[:-1])
    return 1.0 - (p[..., -1] - p[..., -2])


MEASURES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "entropy": entropy,
    "least_confidence": least_confidence,
    "margin": margin,
}
AGGREGATIONS: dict[str, Callable[[np.ndarray], float]] = {
    "max": lambda v: float(v.max()),
    "mean": lambda v: float(v.mean()),
    "sum": lambda v: float(v.sum()),
}


def image_uncertainty(detections: Detections, measure: str, aggregation: str) -> float:
    """One image's uncertainty score (0 for an image without detections)."""
    if len(detections) == 0:
        return 0.0
    values = MEASURES[measure](class_distributions(detections))
    return AGGREGATIONS[aggregation](values)


class UncertaintyStrategy:
    """Ranks by `image_uncertainty`, most uncertain first."""

    def __init__(self, measure: str, aggregation: str) -> None:
        if measure not in MEASURES or aggregation not in AGGREGATIONS:
            raise ValueError(
                f"unknown uncertainty {measure!r}/{aggregation!r}; expected one of {sorted(MEASURES)} × "
                f"{sorted(AGGREGATIONS)}"
            )
        self.measure = measure
        self.aggregation = aggregation
        self.name = f"{measure}_{aggregation}"

    def scores(self, pool: Pool) -> np.ndarray:
        return np.array([image_uncertainty(d, self.measure, self.aggregation) for d in pool.detections])

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> list[Pick]:
        check_budget(pool, budget)
        label = self.measure.replace("_", " ")
        return ranking(self.scores(pool), rng, label + " " + self.aggregation + " {value:.3g} (rank {rank})")
