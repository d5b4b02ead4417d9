"""Reward estimators of MAGRAL's look-up table, all behind `evaluate(indices, seed) -> float` (`RewardFn`;
indices are positions in the round's unlabeled pool), chosen by name (`Config.reward`, MAGRAL_REWARD):

- `proxy` [paper]: the semi-supervised proxy (`magral_core.method.proxy`: frozen task detector, box predictor
  trained with CSD flip consistency on the batch, unlabeled);
- `pseudo_label` [ours]: the batch enters with the detector's confident predictions as labels and the box
  head's tail is trained (`pseudo_label`);
- `retrospective` [ours]: supervised gains of true-labeled batches measured inside the labeled set, carried
  to the pool by a ridge surrogate over label-free image features (`retrospective`).

`noise.NoiseControlled` wraps any of them with common random numbers, several seeds and paired
differences. Every estimator measures on the round's validation part, never on a test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from magral_core.config import REWARD_NAMES
from magral_core.method.rewards.noise import NoiseControlled, RewardFn
from magral_core.structures import DetectionDataset, Detections

REWARDS: tuple[str, ...] = REWARD_NAMES
"""Names `make_reward` knows, the paper's first (`config.REWARD_NAMES`: a config is checked without this)."""


@dataclass(frozen=True, eq=False)
class RewardRound:
    """What a reward may read of one round: the task detector (trained on `labeled` only), the labeled
    training images with their labels, the validation part (labeled, held out of the detector's training),
    the unlabeled pool (its labels, if a benchmark's dataset has any, are never read) and label-free
    detector outputs: detections and embeddings of the pool and of the labeled images (empty when the
    estimator does not need them)."""

    model: Any
    labeled: DetectionDataset
    val: DetectionDataset
    pool: DetectionDataset
    pool_detections: Sequence[Detections] = ()
    pool_embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    labeled_detections: Sequence[Detections] = ()
    labeled_embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


def needs_detections(name: str) -> bool:
    """Whether reward `name` reads the round's label-free detections and embeddings."""
    return name != "proxy"


def make_reward(name: str, round_: RewardRound, *, budget: int, score_threshold: float = 0.05,
                pseudo_threshold: float = 0.5, seed: int = 0, noise_seeds: int = 1,
                paired: bool = False) -> RewardFn:
    """The reward called `name` (one of `REWARDS`) for `round_`; `paired`/`noise_seeds` wrap it in
    `NoiseControlled` with the round's `seed` as the common seed. Raises ValueError for an unknown name."""
    from magral_core.method.proxy import ProxySettings, proxy_for
    from magral_core.method.rewards.heads import HeadSettings
    from magral_core.method.rewards.pseudo_label import PseudoLabelReward
    from magral_core.method.rewards.retrospective import RetrospectiveReward, RetrospectiveSettings, with_head

    reward: RewardFn
    if name == "proxy":
        reward = proxy_for(round_.model, round_.labeled, round_.pool, round_.val,
                           ProxySettings(score_threshold=score_threshold))
    elif name == "pseudo_label":
        reward = PseudoLabelReward(round_.model, round_.labeled, round_.pool, round_.pool_detections,
                                   round_.val, threshold=pseudo_threshold,
                                   settings=HeadSettings(score_threshold=score_threshold))
    elif name == "retrospective":
        reward = RetrospectiveReward(
            round_.model, round_.labeled, round_.labeled_detections, round_.labeled_embeddings,
            round_.pool_detections, round_.pool_embeddings, round_.val, batch_size=budget, seed=seed,
            settings=with_head(RetrospectiveSettings(), score_threshold=score_threshold))
    else:
        raise ValueError(f"unknown reward {name!r}; known: {list(REWARDS)}")
    if paired or noise_seeds > 1:
        reward = NoiseControlled(reward, seeds=noise_seeds, paired=paired, common_seed=seed)
    return reward


__all__ = ["REWARDS", "NoiseControlled", "RewardFn", "RewardRound", "make_reward", "needs_detections"]
