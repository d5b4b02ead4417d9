"""A PPAL-style two-stage baseline: difficulty-calibrated uncertainty, then diversity over the embeddings.

PPAL ("Plug and Play Active Learning for Object Detection", Yang et al., CVPR 2024) **[paper]**:
stage 1 (difficulty-calibrated uncertainty sampling) scores each detection's class entropy, weights it by a
per-class coefficient that grows with how hard the current detector finds the class, sums the weighted
values over the image and keeps the `candidate_ratio` × budget highest images; stage 2 picks the batch
from those candidates for diversity, with k-means++ seeding.

What this module makes of it **[ours]**:

- class quality q_c: the per-class AP when given (`class_quality=`), else the mean confidence of the pool's
  detections of class c (a class the detector never predicts gets q_c = 0, which weights nothing, since
  it has no detections); difficulty is 1 − q_c;
- the weight w_c = 1 + α·u·log(1 + b·(1 − q_c)) with b = e^(1/α) − 1, which rises concavely from 1 at
  q_c = 1 to 1 + u at q_c = 0 (the form of a public PPAL implementation; u = `weight_ub`, α =
  `weight_alpha`);
- stage 2 runs on the pooled backbone embeddings (PPAL matches per-class instance features): the most
  uncertain candidate first, then each next one drawn with probability ∝ its squared L2 distance to the
  nearest one already drawn (uniformly when every remaining candidate duplicates a drawn one);
- the ranking covers the whole pool: the batch, then the other candidates in the order the seeding goes on
  drawing them, then the non-candidates by calibrated uncertainty, most uncertain first. An image without
  detections scores 0, so it is a candidate only when fewer than `candidate_ratio` × budget images have an
  uncertain detection.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from magral_core.method.features import class_distributions, entropy
from magral_core.method.strategies.base import Pick, Pool, check_budget
from magral_core.structures import Detections


def pool_class_quality(detections: Sequence[Detections], num_classes: int) -> np.ndarray:
    """(C,) mean score of the detections of each class over the pool; 0 for a class with no detection."""
    total = np.zeros(num_classes)
    count = np.zeros(num_classes)
    for det in detections:
        labels = np.asarray(det.labels, dtype=np.int64)
        np.add.at(total, labels, np.asarray(det.scores, dtype=np.float64))
        np.add.at(count, labels, 1.0)
    return np.where(count > 0, total / np.maximum(count, 1.0), 0.0)


def difficulty_weights(
    quality: np.ndarray, *, weight_ub: float = 0.2, weight_alpha: float = 0.3
) -> np.ndarray:
    """(C,) weights 1 + α·u·log(1 + b·(1 − q)), b = e^(1/α) − 1: 1 at quality 1, 1 + u at quality 0.

    Quality is clipped to [0, 1]. Raises ValueError for α <= 0 or u < 0.
    """
    if weight_alpha <= 0 or weight_ub < 0:
        raise ValueError(f"weight_alpha must be > 0 and weight_ub >= 0, found {weight_alpha}, {weight_ub}")
    hardness = 1.0 - np.clip(np.asarray(quality, dtype=np.float64), 0.0, 1.0)
    b = np.expm1(1.0 / weight_alpha)
    return 1.0 + weight_alpha * weight_ub * np.log1p(b * hardness)


def calibrated_uncertainty(detections: Sequence[Detections], weights: np.ndarray) -> np.ndarray:
    """(N,) per image: Σ over its detections of entropy(class distribution) × weights[label]; 0 without
    detections."""
    out = np.zeros(len(detections))
    for i, det in enumerate(detections):
        if len(det):
            out[i] = float((entropy(class_distributions(det)) * weights[np.asarray(det.labels)]).sum())
    return out


def kmeans_pp_order(embeddings: np.ndarray, first: int, rng: np.random.Generator) -> np.ndarray:
    """All rows of `embeddings` (N, D) in k-means++ seeding order from row `first`: each next row drawn with
    probability ∝ its squared L2 distance to the nearest row drawn so far (uniformly among the rest when
    all those distances are 0)."""
    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    order = [first]
    dist = ((x - x[first]) ** 2).sum(1)  # (N,)
    left = np.ones(n, bool)
    left[first] = False
    while len(order) < n:
        d = np.where(left, dist, 0.0)
        p = d / d.sum() if d.sum() > 0 else left / left.sum()
        i = int(rng.choice(n, p=p))
        order.append(i)
        left[i] = False
        dist = np.minimum(dist, ((x - x[i]) ** 2).sum(1))
    return np.asarray(order, dtype=np.int64)


class PpalStrategy:
    """Two-stage ranking (see module docstring).

    `candidate_ratio`: candidate set size as a multiple of the batch (>= 1, default 4); `class_quality`:
    per-class quality in [0, 1] such as AP, indexed by 0-based label (default: the pool's mean confidence);
    `weight_ub`, `weight_alpha`: the difficulty weight's range and curvature.
    """

    name = "ppal"

    def __init__(
        self,
        *,
        candidate_ratio: float = 4.0,
        class_quality: Sequence[float] | None = None,
        weight_ub: float = 0.2,
        weight_alpha: float = 0.3,
    ) -> None:
        if candidate_ratio < 1:
            raise ValueError(f"candidate_ratio must be >= 1, found {candidate_ratio}")
        self.candidate_ratio = candidate_ratio
        self.class_quality = None if class_quality is None else np.asarray(class_quality, dtype=np.float64)
        self.weight_ub = weight_ub
        self.weight_alpha = weight_alpha

    def scores(self, pool: Pool) -> np.ndarray:
        """(N,) stage-1 calibrated uncertainty of every pool image."""
        seen = max((int(np.max(d.labels)) + 1 for d in pool.detections if len(d)), default=0)
        quality = self.class_quality
        if quality is None:
            quality = pool_class_quality(pool.detections, seen)
        elif len(quality) < seen:
            raise ValueError(f"class_quality has {len(quality)} classes, detections use label {seen - 1}")
        weights = difficulty_weights(quality, weight_ub=self.weight_ub, weight_alpha=self.weight_alpha)
        return calibrated_uncertainty(pool.detections, weights)

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> list[Pick]:
        batch = check_budget(pool, budget)
        n = len(pool)
        if n == 0:
            return []
        score = self.scores(pool)
        by_score = np.lexsort((rng.random(n), -score))  # most uncertain first, ties at random
        size = min(n, max(batch, int(np.ceil(self.candidate_ratio * batch))))
        candidates = by_score[:size]
        # candidates[0] is the most uncertain one: the seeding starts there.
        order = candidates[kmeans_pp_order(pool.embeddings[candidates], 0, rng)]
        out = []
        for r, i in enumerate(np.concatenate([order, by_score[size:]])):
            stage = "diversity" if r < batch else "candidate" if r < size else "uncertainty"
            out.append(Pick(int(i), 1.0 - r / n,
                            f"ppal {stage}: calibrated uncertainty {score[i]:.3g} (rank {r + 1})"))
        return out
