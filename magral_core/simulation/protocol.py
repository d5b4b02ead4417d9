"""The active-learning protocol as bookkeeping over injected functions.

For each strategy and seed: draw an initial random labeled set from the pool (the same for every strategy
under one seed), then per round train the learner on the labeled set, evaluate it on the learner's own test
split, hand the strategy a `Pool` of the unlabeled images' features and move its first `budget` picks into
the labeled set. Round r's record holds the metrics of the model trained on that round's labeled set and
the batch chosen after it.

The test split is kept out of selection by construction: strategies receive a `Pool` built by
`Learner.pool` from pool images only, and a `StrategyFactory` receives a `RoundContext` (pool features and
the learner's `proxy`, which sees labeled and pool images) with no handle on `Learner.evaluate`.

Every finished round is written as JSON atomically (`RoundStore`), so a killed run resumes where it stopped.

Kept as one module because it is the one place that says what a round of a curve does in which order
(candidates, train, evaluate, features, rank) and what a resumed run reads back of it.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from magral_core.atomic import atomic_open, write_text_atomic
from magral_core.method.candidates import CandidateRule, candidate_positions
from magral_core.method.strategies import (
    MagralSettings,
    Pool,
    Strategy,
    fit_magral,
    make_strategy,
    policy_response,
)


@dataclass(frozen=True)
class Metrics:
    """Test metrics of one trained model: COCO mAP@[.5:.95], AP50 and AP per class name."""

    map: float
    ap50: float
    per_class_ap: dict[str, float] = field(default_factory=dict)


ProxyFn = Callable[[np.ndarray, int], float]
"""`proxy(batch, seed) -> mAP`: batch = positions in the round's Pool, trained with them unlabeled."""


class Learner(Protocol):
    """What the protocol needs from a detector (or a toy). Indices are positions in the learner's pool
    (the images that may be labeled); the test split is the learner's own business."""

    @property
    def pool_size(self) -> int: ...

    def train(self, labeled: np.ndarray, *, seed: int, previous: Any = None) -> Any:
        """Train on the labeled pool images, starting from `previous` (the last round's state of the same
        curve) when given; returns an opaque model state, which must pickle."""
        ...

    def evaluate(self, state: Any) -> Metrics:
        """Metrics of `state` on the test split."""
        ...

    def pool(self, state: Any, unlabeled: np.ndarray, labeled: np.ndarray) -> Pool:
        """Features of the `unlabeled` images (Pool position k = unlabeled[k]) and labeled embeddings."""
        ...

    def proxy(self, state: Any, labeled: np.ndarray, unlabeled: np.ndarray) -> ProxyFn | None:
        """The semi-supervised proxy for MAGRAL's look-up table, or None when the learner has none."""
        ...


@dataclass(frozen=True)
class RoundContext:
    """What a strategy factory may use to build a round's strategy (no test data)."""

    round: int
    seed: int
    budget: int
    labeled: np.ndarray
    unlabeled: np.ndarray
    pool: Pool
    proxy: ProxyFn | None


StrategyFactory = Callable[[str, RoundContext], Strategy]


def make_factory(magral: MagralSettings | None = None) -> StrategyFactory:
    """Baselines by name; "magral" fitted each round on the round's proxy with `fit_magral(magral)`."""
    settings = magral or MagralSettings()

    def factory(name: str, context: RoundContext) -> Strategy:
        if name != "magral":
            return make_strategy(name)
        if context.proxy is None:
            raise ValueError("strategy 'magral' needs a learner with a proxy")
        assert context.pool.features is not None
        strategy, report = fit_magral(context.pool.features, context.budget, context.proxy, settings,
                                      seed=context.seed)
        strategy.diagnostics = policy_response(context.pool.features, context.budget, strategy, report,
                                               settings, seed=context.seed)
        return strategy

    return factory


default_factory = make_factory()


@dataclass(frozen=True)
class SimulationSettings:
    """The protocol: initial random labeled images, images added per round, rounds after the initial one;
    `candidates`, the service's candidate-subset rule (`method.candidates`; None: every round ranks the
    whole unlabeled pool); `warm`: every round after the first trains from the previous round's model of
    its curve, as the service's rounds do (False: from scratch each round, the paper's protocol)."""

    initial: int = 20
    budget: int = 10
    rounds: int = 5
    strategies: tuple[str, ...] = ("random",)
    seeds: tuple[int, ...] = (0,)
    candidates: CandidateRule | None = None
    warm: bool = False


@dataclass
class RoundRecord:
    """One trained model of one curve. `times` are seconds per component (train, evaluate, features,
    fit_strategy, select); `seconds` is their sum."""

    strategy: str
    seed: int
    round: int
    n_labeled: int
    map: float
    ap50: float
    per_class_ap: dict[str, float]
    seconds: float
    times: dict[str, float]
    labeled: list[int]
    selected: list[int]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    """What the strategy's fit measured (MAGRAL: `strategies.policy_response`); empty for heuristics."""
    ranked: int = 0
    """Unlabeled images the round ranked: all of them, or its candidates when a candidate rule applied."""
    carried: list[int] = field(default_factory=list)
    """Under a candidate rule: the images ranked right after the batch (at most the rule's `carry`), which
    the next round's candidates carry."""
    warm: bool = False
    """Whether the round's model was trained from the previous round's (`SimulationSettings.warm`)."""
    machine: str = ""
    """Where the round ran (`vision.engine.machine_fingerprint`; empty when unknown): equal seeds give
    equal models only on equal machines, so a resumed run's paired differences across machines carry
    machine noise (`statistics.round_zero_spread` measures it)."""

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RoundRecord:
        return RoundRecord(**data)


class RoundStore:
    """`<root>/<strategy>/seed<seed>/round<r>.json`, each written atomically; for warm curves also
    `round<r>.state.pkl`, the pickled model state of round r, kept until round r + 1 is stored (a resumed
    warm curve starts from it)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, strategy: str, seed: int, round_: int) -> Path:
        return self.root / strategy / f"seed{seed}" / f"round{round_:03d}.json"

    def load(self, strategy: str, seed: int, round_: int) -> RoundRecord | None:
        path = self.path(strategy, seed, round_)
        return RoundRecord.from_dict(json.loads(path.read_text())) if path.is_file() else None

    def save(self, record: RoundRecord) -> None:
        write_atomic(self.path(record.strategy, record.seed, record.round), json.dumps(asdict(record)))

    def state_path(self, strategy: str, seed: int, round_: int) -> Path:
        return self.path(strategy, seed, round_).with_suffix(".state.pkl")

    def save_state(self, strategy: str, seed: int, round_: int, state: Any) -> None:
        with atomic_open(self.state_path(strategy, seed, round_), "wb") as out:
            pickle.dump(state, out, protocol=pickle.HIGHEST_PROTOCOL)

    def load_state(self, strategy: str, seed: int, round_: int) -> Any:
        """Round `round_`'s pickled model state; raises ValueError when the store has none."""
        path = self.state_path(strategy, seed, round_)
        if not path.is_file():
            raise ValueError(f"{path} is missing: a warm curve resumes from its last stored round's model; "
                             f"delete {self.path(strategy, seed, round_)} to retrain that round")
        with path.open("rb") as f:
            return pickle.load(f)

    def drop_state(self, strategy: str, seed: int, round_: int) -> None:
        self.state_path(strategy, seed, round_).unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (see `magral_core.atomic`)."""
    write_text_atomic(path, text)


def initial_labeled(pool_size: int, initial: int, seed: int) -> np.ndarray:
    """The seed's initial random labeled set (sorted pool indices), shared by every strategy."""
    if not 0 < initial <= pool_size:
        raise ValueError(f"initial labeled set must be within [1, {pool_size}], found {initial}")
    return np.sort(np.random.default_rng(seed).choice(pool_size, size=initial, replace=False))


def run_curve(
    learner: Learner,
    strategy_name: str,
    seed: int,
    settings: SimulationSettings,
    *,
    factory: StrategyFactory = default_factory,
    store: RoundStore | None = None,
    log: Callable[[RoundRecord], None] | None = None,
    shared: dict[int, _Trained] | None = None,
    machine: str = "",
) -> list[RoundRecord]:
    """One active-learning curve (rounds 0..settings.rounds); finished rounds in `store` are reused.

    `shared` maps a seed to its round-0 model, metrics and pool: round 0 is the same for every strategy
    (same initial set, same training seed), so `run_simulation` trains and evaluates it once per seed.
    A warm curve (`settings.warm`) trains round r from round r - 1's state: kept in memory, or read back
    from `store` when the curve resumes. `machine` is written into each new record (`RoundRecord.machine`).
    """
    labeled = initial_labeled(learner.pool_size, settings.initial, seed)
    records: list[RoundRecord] = []
    state: Any = None
    for r in range(settings.rounds + 1):
        done = store.load(strategy_name, seed, r) if store else None
        if done is not None and r > 0 and done.warm != settings.warm:
            raise ValueError(f"round {r} of {strategy_name} seed {seed} in the store was trained "
                             f"{'warm' if done.warm else 'from scratch'}; this run trains "
                             f"{'warm' if settings.warm else 'from scratch'}: use another store")
        if done is None:
            carried = records[-1].carried if records else []
            if settings.warm and r > 0 and state is None:
                if store is None:
                    raise ValueError("a warm curve needs the previous round's state")
                state = store.load_state(strategy_name, seed, r - 1)
            done, state = _round(learner, strategy_name, seed, r, labeled, settings, factory,
                                 shared if r == 0 else None, carried, state if settings.warm else None,
                                 machine)
            if store:
                if settings.warm and r < settings.rounds:  # before the record: a stored round has its state
                    store.save_state(strategy_name, seed, r, state)
                store.save(done)
                if r > 0:
                    store.drop_state(strategy_name, seed, r - 1)
            if log:
                log(done)
        else:
            state = None
        records.append(done)
        labeled = np.union1d(np.asarray(done.labeled, dtype=np.int64), np.asarray(done.selected, np.int64))
    return records


def _round(
    learner: Learner,
    strategy_name: str,
    seed: int,
    r: int,
    labeled: np.ndarray,
    settings: SimulationSettings,
    factory: StrategyFactory,
    shared: dict[int, _Trained] | None,
    carried: list[int],
    previous: Any,
    machine: str,
) -> tuple[RoundRecord, Any]:
    unlabeled = np.setdiff1d(np.arange(learner.pool_size), labeled)
    rule = settings.candidates
    subset = rule is not None and rule.applies(len(unlabeled))
    if rule is not None and subset:  # as the service does: `service.tasks.candidate_tasks`
        position = {int(u): k for k, u in enumerate(unlabeled)}
        chosen = candidate_positions(len(unlabeled), settings.budget, rule,
                                     [position[c] for c in carried if c in position], seed=(seed, r))
        unlabeled = unlabeled[chosen]
    want_pool = r < settings.rounds and len(unlabeled) > 0
    trained = shared.get(seed) if shared is not None else None
    if trained is None:
        trained = _train(learner, labeled, unlabeled, seed * 1000 + r, want_pool, previous)
        if shared is not None:
            shared[seed] = trained
    state, metrics, pool, times = trained.state, trained.metrics, trained.pool, dict(trained.times)
    selected: list[int] = []
    next_carried: list[int] = []
    diagnostics: dict[str, Any] = {}
    if pool is not None:
        if len(pool) != len(unlabeled):
            raise ValueError(f"learner returned a pool of {len(pool)} images for {len(unlabeled)} unlabeled")
        t = time.perf_counter()
        context = RoundContext(r, seed * 1000 + r, settings.budget, labeled, unlabeled, pool,
                               learner.proxy(state, labeled, unlabeled))
        strategy = factory(strategy_name, context)
        times["fit_strategy"] = time.perf_counter() - t
        t = time.perf_counter()
        batch = min(settings.budget, len(unlabeled))
        picks = strategy.rank(pool, batch, np.random.default_rng([seed, r]))
        times["select"] = time.perf_counter() - t
        selected = [int(unlabeled[p.index]) for p in picks[:batch]]
        if rule is not None and subset:
            next_carried = [int(unlabeled[p.index]) for p in picks[batch:batch + rule.carry]]
        diagnostics = dict(getattr(strategy, "diagnostics", {}))
    return RoundRecord(
        strategy=strategy_name, seed=seed, round=r, n_labeled=len(labeled), map=metrics.map,
        ap50=metrics.ap50, per_class_ap=dict(metrics.per_class_ap),
        seconds=sum(times.values()), times=times,
        labeled=[int(i) for i in labeled], selected=selected, diagnostics=diagnostics,
        ranked=len(unlabeled) if pool is not None else 0, carried=next_carried,
        warm=settings.warm and previous is not None, machine=machine,
    ), state


@dataclass(frozen=True)
class _Trained:
    """A model trained on one labeled set: its state, test metrics, pool features and their times."""

    state: Any
    metrics: Metrics
    pool: Pool | None
    times: dict[str, float]


def _train(learner: Learner, labeled: np.ndarray, unlabeled: np.ndarray, seed: int, want_pool: bool,
           previous: Any = None) -> _Trained:
    times: dict[str, float] = {}
    t = time.perf_counter()
    state = learner.train(labeled, seed=seed, previous=previous)
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = learner.evaluate(state)
    times["evaluate"] = time.perf_counter() - t
    pool = None
    if want_pool:
        t = time.perf_counter()
        pool = learner.pool(state, unlabeled, labeled)
        times["features"] = time.perf_counter() - t
    return _Trained(state, metrics, pool, times)


def run_simulation(
    learner: Learner,
    settings: SimulationSettings,
    *,
    factory: StrategyFactory = default_factory,
    store: RoundStore | None = None,
    log: Callable[[RoundRecord], None] | None = None,
    machine: str = "",
) -> list[RoundRecord]:
    """Every strategy × seed curve, in that order; `machine` as in `run_curve`."""
    out: list[RoundRecord] = []
    shared: dict[int, _Trained] = {}
    for name in settings.strategies:
        for seed in settings.seeds:
            out += run_curve(learner, name, seed, settings, factory=factory, store=store, log=log,
                             shared=shared, machine=machine)
    return out
