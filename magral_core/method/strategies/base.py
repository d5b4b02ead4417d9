"""The strategy interface shared by MAGRAL and the baselines: a `Pool` in, a full ranking of `Pick`s out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from magral_core.method.features import pool_features
from magral_core.structures import Detections


@dataclass(frozen=True)
class Pick:
    """One pool image in a ranking: its position in the `Pool`, its priority (higher = label sooner) and a
    one-line human-readable reason, e.g. "entropy max 1.23 (rank 3)"."""

    index: int
    priority: float
    reason: str


@dataclass(frozen=True, eq=False)
class Pool:
    """What a strategy may see: the unlabeled images' cached features and the labeled embeddings.

    `embeddings` (N, D) pooled backbone embeddings of the unlabeled images; `detections` their N detector
    outputs; `labeled_embeddings` (L, D) of the labeled images (L may be 0); `features` (N, F) normalised
    per-image features for learned strategies (computed by `features.pool_features` when not given).
    Nothing about the test split is ever part of a Pool.
    """

    embeddings: np.ndarray
    detections: tuple[Detections, ...]
    labeled_embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        emb = np.asarray(self.embeddings, dtype=np.float32)
        if emb.ndim != 2 or len(emb) != len(self.detections):
            raise ValueError(
                f"pool: expected embeddings (N, D) for N={len(self.detections)} detections, found {emb.shape}"
            )
        lab = np.asarray(self.labeled_embeddings, dtype=np.float32)
        lab = lab.reshape(0, emb.shape[1]) if lab.size == 0 else lab
        if lab.ndim != 2 or lab.shape[1] != emb.shape[1]:
            raise ValueError(f"pool: labeled embeddings must be (L, {emb.shape[1]}), found {lab.shape}")
        object.__setattr__(self, "embeddings", emb)
        object.__setattr__(self, "detections", tuple(self.detections))
        object.__setattr__(self, "labeled_embeddings", lab)
        if self.features is None:
            feats = pool_features(emb, self.detections) if len(emb) else np.zeros((0, emb.shape[1] + 5))
            object.__setattr__(self, "features", feats.astype(np.float32))
        elif len(self.features) != len(emb):
            raise ValueError(f"pool: {len(self.features)} feature rows for {len(emb)} images")

    def __len__(self) -> int:
        return len(self.detections)


class Strategy(Protocol):
    """Ranks a whole pool, best first; the first `budget` picks are the batch to label."""

    name: str

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> list[Pick]: ...


def check_budget(pool: Pool, budget: int) -> int:
    """The batch size actually available: min(budget, len(pool)). Raises ValueError for budget < 1."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, found {budget}")
    return min(budget, len(pool))


def ranking(priority: np.ndarray, rng: np.random.Generator, describe: str) -> list[Pick]:
    """Picks ordered by decreasing `priority`, ties broken at random by `rng`.

    `describe` is a format string with `{value}` and `{rank}` fields giving each pick's reason.
    """
    priority = np.asarray(priority, dtype=np.float64)
    tiebreak = rng.random(len(priority))
    order = np.lexsort((tiebreak, -priority))
    return [
        Pick(int(i), float(priority[i]), describe.format(value=priority[i], rank=r + 1))
        for r, i in enumerate(order)
    ]


def ordered(order: Sequence[int], priority: np.ndarray, describe: str) -> list[Pick]:
    """Picks in the given order (already best first), with reasons from `describe`."""
    return [
        Pick(int(i), float(priority[i]), describe.format(value=priority[i], rank=r + 1))
        for r, i in enumerate(order)
    ]
