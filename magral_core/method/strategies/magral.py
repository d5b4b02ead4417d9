"""MAGRAL as a strategy: a trained controller's deterministic scores rank the pool; `fit_magral` builds one.

`fit_magral` runs one round of the method on cached pool features, given `evaluate(indices, seed) -> mAP`
(the semi-supervised proxy trained with that batch unlabeled): random records, the best estimator on them,
policy training on the estimated ΔmAP (estimate minus the mean record value), then records near the
policy (samples at a raised temperature and local swaps of the best batch so far), a refit, and more
training. `fit_magral` computes the records one after another; a service splits it at the records
(`begin_fit`, then `end_fit`) and computes each stage's records in parallel (`lookup_table.compute_record`
over `initial_record_specs`, then over `MagralFit.pending`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from magral_core.method.lookup_table import (
    Record,
    RecordSpec,
    best_estimator,
    compute_record,
    policy_batches,
    random_batches,
    specs,
    swapped_batches,
)
from magral_core.method.policy import Controller, ControllerConfig, build_controller
from magral_core.method.policy_training import TrainingHistory, TrainingSettings, train_policy
from magral_core.method.strategies.base import Pick, Pool, check_budget, ranking


class MagralStrategy:
    """Deterministic top-B by controller score; the rest of the pool ranked by score too. `diagnostics`
    holds what a fit measured about it (see `policy_response`), for the simulator's round records."""

    name = "magral"

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.diagnostics: dict[str, float | int | str] = {}

    def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> list[Pick]:
        batch = check_budget(pool, budget)
        assert pool.features is not None  # filled by Pool
        if pool.features.shape[1] != self.controller.config.in_features:
            raise ValueError(
                f"controller expects {self.controller.config.in_features} features per image, "
                f"the pool has {pool.features.shape[1]}"
            )
        scores = self.controller.scores(pool.features, batch)
        return ranking(scores, rng, "magral score {value:.3g} (rank {rank})")


@dataclass(frozen=True)
class MagralSettings:
    """One round of MAGRAL fitting."""

    records: int = 24
    """Look-up-table records (proxy evaluations) in all."""
    policy_fraction: float = 0.5
    """Share of the records generated near the policy after a first fit (the rest are random)."""
    neighbours: int = 4
    """M of the look-up table."""
    temperature: float = 2.0
    """Sampling temperature of the near-policy records."""
    variant: str = "gumbel"
    """Controller variant."""
    hidden: int = 64
    """Controller hidden size."""
    training: TrainingSettings = field(default_factory=TrainingSettings)
    """Policy-gradient settings; `updates` are split evenly before and after the near-policy records."""


@dataclass
class MagralReport:
    """What a fit measured: estimator fidelity (held-out Spearman ρ per estimator kind, per stage), the
    chosen estimator per stage, the records and the training history."""

    fidelity: list[dict[str, float]] = field(default_factory=list)
    estimator: list[str] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    history: list[TrainingHistory] = field(default_factory=list)


def initial_record_specs(
    pool_size: int, budget: int, settings: MagralSettings, *, seed: int
) -> list[RecordSpec]:
    """The uniformly random records `fit_magral` computes first (same generator, same order): they need no
    policy, so a queue can compute them in parallel before the fit and pass them in as `records`."""
    n_policy = round(settings.records * settings.policy_fraction)
    rng = np.random.default_rng(seed)
    return specs(random_batches(pool_size, min(budget, pool_size), max(1, settings.records - n_policy), rng),
                 "random", seed=seed)


@dataclass
class MagralFit:
    """A fit between its two stages of records: the controller after the first training stage, the report so
    far, the generator that continues the fit's stream, and the near-policy specs still to be computed."""

    controller: Controller
    report: MagralReport
    rng: np.random.Generator
    pending: list[RecordSpec]


def begin_fit(
    features: np.ndarray,
    budget: int,
    evaluate: Callable[[np.ndarray, int], float],
    settings: MagralSettings = MagralSettings(),
    *,
    seed: int = 0,
    records: Sequence[Record] = (),
) -> MagralFit:
    """The first stage of `fit_magral`: the random records (`records` already computed for
    `initial_record_specs(...)` are used instead of calling `evaluate` for those specs), the best estimator
    on them, the first half of the policy training, and the near-policy specs (`MagralFit.pending`)."""
    n = len(features)
    budget = min(budget, n)
    rng = np.random.default_rng(seed + 1)  # the initial specs use their own generator seeded with `seed`
    report = MagralReport()
    n_policy = round(settings.records * settings.policy_fraction)
    known = {tuple(r.indices.tolist()): r for r in records}
    for spec in initial_record_specs(n, budget, settings, seed=seed):
        done = known.get(tuple(sorted(spec.indices)))
        report.records.append(done if done is not None else compute_record(spec, evaluate))
    controller = build_controller(
        ControllerConfig(features.shape[1], variant=settings.variant, hidden=settings.hidden), seed=seed
    )
    history = _train_stage(controller, features, budget, settings, report, rng, stage=0, seed=seed)
    pending: list[RecordSpec] = []
    if n_policy:
        sampled = policy_batches(controller, features, budget, n_policy - n_policy // 2,
                                 temperature=settings.temperature, seed=seed)
        best = np.asarray(history.best_batch or controller.select(features, budget).tolist())
        near = swapped_batches(best, n, n_policy // 2, rng)
        pending = specs(sampled, "policy", seed=seed) + specs(near, "swap", seed=seed)
    return MagralFit(controller, report, rng, pending)


def end_fit(
    fit: MagralFit,
    features: np.ndarray,
    budget: int,
    settings: MagralSettings = MagralSettings(),
    *,
    seed: int = 0,
    records: Sequence[Record] = (),
) -> tuple[MagralStrategy, MagralReport]:
    """The second stage of `fit_magral`: add the near-policy `records` (computed for `fit.pending`, in that
    order), refit the estimator and run the second half of the policy training."""
    if len(records) != len(fit.pending):
        raise ValueError(f"expected {len(fit.pending)} near-policy records, found {len(records)}")
    fit.report.records.extend(records)
    _train_stage(fit.controller, features, min(budget, len(features)), settings, fit.report, fit.rng,
                 stage=1, seed=seed)
    return MagralStrategy(fit.controller), fit.report


def _train_stage(controller: Controller, features: np.ndarray, budget: int, settings: MagralSettings,
                 report: MagralReport, rng: np.random.Generator, *, stage: int, seed: int) -> TrainingHistory:
    """One training stage: the best estimator on the records so far, then half of the policy updates on
    its estimated ΔmAP (estimate minus the mean record value)."""
    estimator, rho = best_estimator(
        len(features), report.records, rng, neighbours=settings.neighbours, features=features
    )
    report.fidelity.append(rho)
    report.estimator.append(estimator.name)
    reference = float(np.mean([r.value for r in report.records]))

    def reward(indices: np.ndarray) -> float:
        return float(estimator.estimate_many([indices])[0]) - reference

    first = settings.training.updates // 2
    updates = first if stage == 0 else settings.training.updates - first
    history = train_policy(controller, features, budget, reward,
                           replace(settings.training, updates=updates, seed=seed + stage))
    report.history.append(history)
    return history


def fit_magral(
    features: np.ndarray,
    budget: int,
    evaluate: Callable[[np.ndarray, int], float],
    settings: MagralSettings = MagralSettings(),
    *,
    seed: int = 0,
    records: Sequence[Record] = (),
) -> tuple[MagralStrategy, MagralReport]:
    """Fit a controller for a pool of `features` (N, F) and a batch size `budget` (see module docstring):
    `begin_fit`, the near-policy records computed here one after another, `end_fit`.

    `records` already computed for `initial_record_specs(...)` (e.g. by parallel jobs) are used instead of
    calling `evaluate` for those specs.
    """
    fit = begin_fit(features, budget, evaluate, settings, seed=seed, records=records)
    near = [compute_record(spec, evaluate) for spec in fit.pending]
    return end_fit(fit, features, budget, settings, seed=seed, records=near)


def policy_response(
    features: np.ndarray,
    budget: int,
    chosen: MagralStrategy,
    report: MagralReport,
    settings: MagralSettings = MagralSettings(),
    *,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """Whether the chosen batch answers to the reward: how many of its `budget` images the untrained
    controller (same initialisation) would also pick, and how many a controller trained the same way on the
    same records with their values permuted picks. `overlap_permuted` near `budget` says the batch does not
    depend on which records were worth what (flat or noisy values); `overlap_untrained` near `budget` says
    training barely moved the controller from its initialisation (the entropy bonus moves it even under a flat
    reward). Also the spread of the record values the policy was trained on, and the estimator used last."""
    budget = min(budget, len(features))
    config = ControllerConfig(features.shape[1], variant=settings.variant, hidden=settings.hidden)
    batch = set(chosen.controller.select(features, budget).tolist())
    untrained = set(build_controller(config, seed=seed).select(features, budget).tolist())
    values = np.array([r.value for r in report.records], np.float64)
    shuffled = np.random.default_rng(seed + 101).permutation(values)
    permuted = MagralReport(records=[Record(r.indices, float(v), r.source)
                                     for r, v in zip(report.records, shuffled, strict=True)])
    controller = build_controller(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for stage in (0, 1):
        _train_stage(controller, features, budget, settings, permuted, rng, stage=stage, seed=seed)
    permuted_batch = set(controller.select(features, budget).tolist())
    return {
        "budget": budget,
        "overlap_untrained": len(batch & untrained),
        "overlap_permuted": len(batch & permuted_batch),
        "records": len(values),
        "record_value_std": float(values.std()) if len(values) else 0.0,
        "estimator": report.estimator[-1] if report.estimator else "",
    }
