"""The controller: exact-budget rollouts, the Plackett–Luce log-probability, determinism, checkpoints."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from magral_core.method.policy import (
    ControllerConfig,
    build_controller,
    load_state,
    plackett_luce_log_prob,
    save_state,
)

VARIANTS = ("gumbel", "sequential")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("n", "budget"), [(7, 1), (7, 3), (7, 7), (30, 12)])
def test_every_rollout_selects_exactly_budget_distinct_images(variant: str, n: int, budget: int) -> None:
    controller = build_controller(ControllerConfig(4, variant=variant), seed=0)
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    rollout = controller.sample(x, budget, 16, generator=torch.Generator().manual_seed(2))
    assert rollout.selected.shape == (16, budget)
    for row in rollout.selected.tolist():
        assert len(set(row)) == budget and all(0 <= i < n for i in row)
    assert rollout.log_prob.shape == (16,) and rollout.log_prob.requires_grad
    assert torch.all(rollout.log_prob <= 0)


def test_sequential_log_prob_counts_only_unforced_steps() -> None:
    controller = build_controller(ControllerConfig(2, variant="sequential"))
    rollout = controller.sample(torch.randn(5, 2), 5, 3)  # budget = pool: every step forced
    assert torch.all(rollout.log_prob == 0)


def test_plackett_luce_log_prob_matches_enumeration() -> None:
    s = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    z = s.exp()
    total = 0.0
    for i, j in itertools.permutations(range(4), 2):
        p = float(z[0, i] / z.sum() * z[0, j] / (z.sum() - z[0, i]))
        got = float(plackett_luce_log_prob(s, torch.tensor([[i, j]])))
        assert got == pytest.approx(math.log(p), abs=1e-5)
        total += p
    assert total == pytest.approx(1.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_is_deterministic_and_survives_a_checkpoint(variant: str) -> None:
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    controller = build_controller(ControllerConfig(3, variant=variant), seed=4)
    a = controller.scores(x, 5)
    np.testing.assert_array_equal(a, controller.scores(x, 5))
    again = load_state(save_state(controller))
    np.testing.assert_allclose(again.scores(x, 5), a, atol=1e-6)
    assert controller.select(x, 5).tolist() == np.argsort(-a, kind="stable")[:5].tolist()
    other = build_controller(ControllerConfig(3, variant=variant), seed=5)
    assert not np.allclose(other.scores(x, 5), a)


def test_sampling_is_seeded_and_orders_are_shuffled() -> None:
    controller = build_controller(ControllerConfig(3), seed=0)
    x = torch.randn(50, 3)
    a = controller.sample(x, 5, 4, generator=torch.Generator().manual_seed(9)).selected
    b = controller.sample(x, 5, 4, generator=torch.Generator().manual_seed(9)).selected
    assert torch.equal(a, b)
    assert len({tuple(sorted(r)) for r in a.tolist()}) > 1


def test_bad_arguments_are_refused() -> None:
    controller = build_controller(ControllerConfig(3))
    with pytest.raises(ValueError, match="budget"):
        controller.sample(torch.randn(4, 3), 5, 1)
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        controller.scores(np.zeros(3), 1)
    with pytest.raises(ValueError, match="variant"):
        build_controller(ControllerConfig(3, variant="transformer"))
