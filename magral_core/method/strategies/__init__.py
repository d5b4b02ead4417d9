"""Active-learning strategies behind one interface: `Strategy.rank(pool, budget, rng) -> list[Pick]`.

Names: "random"; "<measure>_<aggregation>" for measure in entropy, least_confidence, margin and
aggregation in max, mean, sum (e.g. "entropy_max", "margin_mean"); "coreset"; "ppal" (difficulty-calibrated
uncertainty, then diversity); "magral" (needs a trained `controller=`, see `fit_magral`).
"""

from __future__ import annotations

from typing import Any

from magral_core.config import STRATEGY_NAMES
from magral_core.method.strategies.base import Pick, Pool, Strategy
from magral_core.method.strategies.coreset import CoresetStrategy, k_center_greedy
from magral_core.method.strategies.magral import (
    MagralFit,
    MagralReport,
    MagralSettings,
    MagralStrategy,
    begin_fit,
    end_fit,
    fit_magral,
    initial_record_specs,
    policy_response,
)
from magral_core.method.strategies.ppal import PpalStrategy
from magral_core.method.strategies.random_sampling import RandomStrategy
from magral_core.method.strategies.uncertainty import (
    AGGREGATIONS,
    MEASURES,
    UncertaintyStrategy,
    image_uncertainty,
)

STRATEGIES: tuple[str, ...] = STRATEGY_NAMES
"""Every registered name (`config.STRATEGY_NAMES`, so that a config is validated without importing this)."""


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """The strategy called `name`; kwargs go to its constructor (coreset: greedy_picks; ppal: candidate_ratio,
    class_quality, weight_ub, weight_alpha; magral: controller). Raises ValueError listing the known names."""
    if name == "random":
        return RandomStrategy()
    if name == "coreset":
        return CoresetStrategy(**kwargs)
    if name == "ppal":
        return PpalStrategy(**kwargs)
    if name == "magral":
        if "controller" not in kwargs:
            raise ValueError(
                "strategy 'magral' needs a trained controller: make_strategy('magral', controller=...)"
            )
        return MagralStrategy(kwargs["controller"])
    for measure in MEASURES:
        for aggregation in AGGREGATIONS:
            if name == f"{measure}_{aggregation}":
                return UncertaintyStrategy(measure, aggregation)
    raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")


__all__ = [
    "STRATEGIES",
    "CoresetStrategy",
    "MagralFit",
    "MagralReport",
    "MagralSettings",
    "MagralStrategy",
    "Pick",
    "Pool",
    "PpalStrategy",
    "RandomStrategy",
    "Strategy",
    "UncertaintyStrategy",
    "begin_fit",
    "end_fit",
    "fit_magral",
    "image_uncertainty",
    "initial_record_specs",
    "k_center_greedy",
    "make_strategy",
    "policy_response",
]
