"""REINFORCE: the estimator against the analytic gradient, and learning a toy environment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magral_core.method.policy import ControllerConfig, build_controller
from magral_core.method.policy_training import TrainingSettings, reinforce_loss, train_policy


def test_reinforce_matches_the_analytic_gradient_of_a_two_armed_bandit() -> None:
    # arm 1 with probability p = σ(θ) pays 1.0, arm 0 pays 0.2: dE[R]/dθ = p(1 - p)(1.0 - 0.2)
    theta = torch.tensor(0.4, requires_grad=True)
    p = torch.sigmoid(theta)
    a = (torch.rand(200_000, generator=torch.Generator().manual_seed(0)) < p.detach()).float()
    log_prob = a * torch.log(p) + (1 - a) * torch.log(1 - p)
    rewards = 0.2 + 0.8 * a
    reinforce_loss(log_prob, rewards, baseline=0.5).backward()
    analytic = float(p.detach() * (1 - p.detach()) * 0.8)
    assert float(-theta.grad) == pytest.approx(analytic, rel=0.02)  # type: ignore[operator]


@pytest.mark.parametrize("variant", ["gumbel", "sequential"])
def test_controller_gradient_estimate_matches_the_exact_gradient(variant: str) -> None:
    # pool of two images, budget 1: the expected reward over both visiting orders is a closed form in the
    # controller's scores, differentiated exactly by autograd; REINFORCE over many rollouts must agree
    controller = build_controller(ControllerConfig(2, variant=variant, hidden=8), seed=3)
    x = torch.tensor([[1.0, -0.5], [-0.3, 0.8]])
    pay = torch.tensor([1.0, 0.0])
    exact = torch.zeros(())
    for order in (torch.tensor([0, 1]), torch.tensor([1, 0])):
        s = controller.ordered_scores(x, order, 1)  # indexed by pool position
        if variant == "gumbel":
            prob_first = torch.softmax(s, 0)
        else:  # the first visited image is taken with σ(score), else the second is forced
            p = torch.sigmoid(s[order[0]])
            prob_first = torch.zeros(2).index_put((order,), torch.stack([p, 1 - p]))
        exact = exact + 0.5 * (prob_first * pay).sum()
    want = torch.autograd.grad(exact, list(controller.parameters()), allow_unused=True)
    # many calls: the gumbel variant's rollouts share one visiting order per call
    gen = torch.Generator().manual_seed(0)
    objective = torch.zeros(())
    for _ in range(100):
        rollout = controller.sample(x, 1, 400, generator=gen)
        rewards = pay[rollout.selected[:, 0]]
        objective = objective - reinforce_loss(rollout.log_prob, rewards, baseline=0.5) / 100
    got = torch.autograd.grad(objective, list(controller.parameters()), allow_unused=True)
    w = torch.cat([g.flatten() for g in want if g is not None])
    g = torch.cat([g.flatten() for g in got if g is not None])
    assert float(torch.dot(w, g) / (w.norm() * g.norm())) > 0.99
    assert float(g.norm() / w.norm()) == pytest.approx(1.0, abs=0.05)


def _toy(n: int, b: int, seed: int) -> tuple[np.ndarray, set[int]]:
    """Features with a visible 'good' flag in column 0; the best batch is exactly the b good images."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    good = rng.choice(n, size=b, replace=False)
    x[:, 0] = -0.3
    x[good, 0] = 3.0
    return x, set(good.tolist())


@pytest.mark.parametrize(
    ("variant", "n", "updates"), [("gumbel", 100, 40), ("sequential", 30, 60)]
)
def test_controller_learns_the_best_batch_of_a_toy_environment(variant: str, n: int, updates: int) -> None:
    b = n // 10
    x, good = _toy(n, b, seed=0)
    controller = build_controller(ControllerConfig(6, variant=variant), seed=0)
    history = train_policy(
        controller, x, b, lambda idx: len(good.intersection(idx.tolist())) / b,
        TrainingSettings(updates=updates, learning_rate=1e-2 if variant == "gumbel" else 2e-2, seed=0),
    )
    assert len(history.reward_mean) == updates and len(history.best_batch) == b
    assert history.reward_mean[0] < 0.5
    chosen = set(controller.select(x, b).tolist())
    assert len(chosen & good) >= 0.9 * b
