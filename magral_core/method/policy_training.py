"""REINFORCE for the selection controller, with any reward `reward(indices) -> float`.

One update: sample `rollouts` batches from the controller (each over its own shuffled pool order), score
each with `reward` (the look-up-table estimate in production: no detector is trained here), and step Adam on

    loss = −mean_r[(R_r − b) / σ · log π(S_r)] − entropy_coef · mean_r H_r

where b is an exponential moving average of past rewards (the baseline, updated after the step) and σ the
square root of an EMA of the squared advantage (only with `normalise_advantage`; it keeps the step size
independent of the reward's scale, which for mAP differences is ~0.01). Gradients are clipped to norm
`grad_clip`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from magral_core.method.policy import Controller


@dataclass(frozen=True)
class TrainingSettings:
    """Hyper-parameters of policy-gradient training."""

    updates: int = 300
    """Optimiser steps."""
    rollouts: int = 8
    """Batches sampled per step (episodes per update)."""
    learning_rate: float = 1e-3
    """Adam learning rate."""
    baseline_decay: float = 0.95
    """EMA decay of the reward baseline (and of the advantage scale)."""
    entropy_coef: float = 1e-4
    """Weight of the entropy bonus."""
    grad_clip: float = 5.0
    """Maximum global gradient norm."""
    normalise_advantage: bool = True
    """Divide advantages by their running RMS."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (scores divided by it)."""
    seed: int = 0
    """Seed of the rollouts' shuffles and samples."""


@dataclass
class TrainingHistory:
    """Per-update statistics and the best batch seen."""

    reward_mean: list[float] = field(default_factory=list)
    reward_max: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    best_reward: float = -math.inf
    best_batch: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "reward_mean": self.reward_mean,
            "reward_max": self.reward_max,
            "baseline": self.baseline,
            "entropy": self.entropy,
            "grad_norm": self.grad_norm,
            "seconds": self.seconds,
            "best_reward": self.best_reward,
            "best_batch": self.best_batch,
        }


def reinforce_loss(
    log_prob: torch.Tensor,
    rewards: torch.Tensor,
    baseline: float,
    *,
    scale: float = 1.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> torch.Tensor:
    """The surrogate whose gradient is the REINFORCE estimate of −∇E[R] (minus the entropy bonus).

    `log_prob` (R,) with gradient, `rewards` (R,) without; `scale` divides the advantage.
    """
    advantage = (rewards - baseline) / scale
    loss = -(advantage.detach() * log_prob).mean()
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * entropy.mean()
    return loss


def train_policy(
    controller: Controller,
    features: np.ndarray,
    budget: int,
    reward: Callable[[np.ndarray], float],
    settings: TrainingSettings = TrainingSettings(),
    *,
    on_update: Callable[[int, TrainingHistory], None] | None = None,
) -> TrainingHistory:
    """Train `controller` in place on a pool of `features` (N, F) to pick `budget` images.

    `reward` gets the sorted pool indices of one batch. `on_update(step, history)` is called after every
    update (progress, early stopping by raising). Returns the history; the controller is left in eval mode.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    gen = torch.Generator().manual_seed(settings.seed)
    optimiser = torch.optim.Adam(controller.parameters(), lr=settings.learning_rate)
    history = TrainingHistory()
    baseline: float | None = None
    sq_adv: float | None = None
    controller.train()
    for step in range(settings.updates):
        start = time.perf_counter()
        rollout = controller.sample(
            x, budget, settings.rollouts, generator=gen, temperature=settings.temperature
        )
        batches = np.sort(rollout.selected.numpy(), axis=1)
        rewards = np.array([float(reward(b)) for b in batches])
        if baseline is None:
            baseline = float(rewards.mean())
        adv = rewards - baseline
        if settings.normalise_advantage:
            batch_sq = float((adv**2).mean())
            sq_adv = batch_sq if sq_adv is None else settings.baseline_decay * sq_adv + (
                1 - settings.baseline_decay
            ) * batch_sq
            scale = math.sqrt(sq_adv) + 1e-8
        else:
            scale = 1.0
        loss = reinforce_loss(
            rollout.log_prob,
            torch.as_tensor(rewards, dtype=torch.float32),
            baseline,
            scale=scale,
            entropy=rollout.entropy,
            entropy_coef=settings.entropy_coef,
        )
        optimiser.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(controller.parameters(), settings.grad_clip)
        optimiser.step()
        baseline = settings.baseline_decay * baseline + (1 - settings.baseline_decay) * float(rewards.mean())

        best = int(np.argmax(rewards))
        if rewards[best] > history.best_reward:
            history.best_reward = float(rewards[best])
            history.best_batch = batches[best].tolist()
        history.reward_mean.append(float(rewards.mean()))
        history.reward_max.append(float(rewards.max()))
        history.baseline.append(baseline)
        history.entropy.append(float(rollout.entropy.detach().mean()))
        history.grad_norm.append(float(grad_norm))
        history.seconds.append(time.perf_counter() - start)
        if on_update is not None:
            on_update(step, history)
    controller.eval()
    return history
