"""The active-learning protocol's bookkeeping, its isolation of the test split and resumption."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from magral_core.method.strategies import Pick, Pool, make_strategy
from magral_core.simulation import (
    Metrics,
    RoundContext,
    RoundStore,
    SimulationSettings,
    ToyLearner,
    ToyState,
    initial_labeled,
    make_factory,
    run_curve,
    run_simulation,
)

SETTINGS = SimulationSettings(
    initial=10, budget=5, rounds=4, strategies=("random", "entropy_max"), seeds=(0, 1)
)


def test_pool_shrinks_labeled_grows_and_no_image_is_chosen_twice() -> None:
    learner = ToyLearner(60)
    records = run_simulation(learner, SETTINGS)
    assert len(records) == 2 * 2 * 5
    for name in SETTINGS.strategies:
        for seed in SETTINGS.seeds:
            curve = [r for r in records if (r.strategy, r.seed) == (name, seed)]
            assert [r.n_labeled for r in curve] == [10, 15, 20, 25, 30]
            assert curve[0].labeled == initial_labeled(60, 10, seed).tolist()
            chosen: list[int] = []
            for before, after in itertools.pairwise(curve):
                assert not set(before.selected) & set(before.labeled)
                assert sorted(after.labeled) == sorted(before.labeled + before.selected)
                chosen += before.selected
            assert len(chosen) == len(set(chosen)) == 20
            assert curve[-1].selected == []
            assert set(curve[0].times) == {"train", "evaluate", "features", "fit_strategy", "select"}


def test_round_zero_is_trained_once_per_seed() -> None:
    trained: list[int] = []

    class Counting(ToyLearner):
        def train(self, labeled: np.ndarray, *, seed: int, previous: Any = None) -> ToyState:
            trained.append(seed)
            return super().train(labeled, seed=seed)

    records = run_simulation(Counting(60), SETTINGS)
    # per seed: round 0 once, then rounds 1..4 for each of the two strategies
    assert len(trained) == 2 * (1 + 2 * 4)
    first = [r for r in records if r.round == 0]
    assert {(r.seed, r.map) for r in first} == {(r.seed, r.map) for r in first if r.strategy == "random"}


class SpyLearner(ToyLearner):
    """A toy learner with a test split whose embeddings are huge: any leak into a Pool is visible."""

    def __init__(self) -> None:
        super().__init__(40)
        self.test_embeddings = np.full((10, self.embeddings.shape[1]), 1e6)
        self.calls: list[str] = []

    def evaluate(self, state: ToyState) -> Metrics:
        self.calls.append("evaluate")
        return super().evaluate(state)

    def pool(self, state: ToyState, unlabeled: np.ndarray, labeled: np.ndarray) -> Pool:
        assert not set(unlabeled.tolist()) & set(labeled.tolist())
        assert sorted([*unlabeled.tolist(), *labeled.tolist()]) == list(range(self.pool_size))
        self.calls.append("pool")
        return super().pool(state, unlabeled, labeled)


def test_selection_never_sees_the_test_split() -> None:
    learner = SpyLearner()
    seen: list[RoundContext] = []

    class Watchful:
        name = "watchful"

        def rank(self, pool: Pool, budget: int, rng: np.random.Generator) -> list[Pick]:
            assert np.abs(pool.embeddings).max() < 1e5 and np.abs(pool.labeled_embeddings).max() < 1e5
            return make_strategy("random").rank(pool, budget, rng)

    def factory(name: str, context: RoundContext) -> Watchful:
        seen.append(context)
        return Watchful()

    run_curve(learner, "watchful", 0, SimulationSettings(initial=5, budget=5, rounds=3), factory=factory)
    assert learner.calls == ["evaluate", "pool"] * 3 + ["evaluate"]
    # a factory gets pool data and the proxy only: nothing that could evaluate on the test split
    assert {f.name for f in fields(RoundContext)} == {
        "round", "seed", "budget", "labeled", "unlabeled", "pool", "proxy"
    }
    assert all(len(c.pool) == len(c.unlabeled) for c in seen)


def test_magral_needs_a_proxy() -> None:
    learner = ToyLearner(30)
    learner.proxy = lambda *args: None  # type: ignore[method-assign, assignment]
    with pytest.raises(ValueError, match="proxy"):
        run_curve(learner, "magral", 0, SimulationSettings(initial=5, budget=5, rounds=1),
                  factory=make_factory())


def test_a_killed_run_resumes_from_the_saved_rounds(tmp_path) -> None:
    settings = SimulationSettings(initial=10, budget=5, rounds=4, strategies=("random",))
    first = run_simulation(ToyLearner(60), settings, store=RoundStore(tmp_path))
    for r in (3, 4):
        RoundStore(tmp_path).path("random", 0, r).unlink()
    trained: list[int] = []

    class Counting(ToyLearner):
        def train(self, labeled: np.ndarray, *, seed: int, previous: Any = None) -> ToyState:
            trained.append(len(labeled))
            return super().train(labeled, seed=seed)

    again = run_simulation(Counting(60), settings, store=RoundStore(tmp_path))
    assert trained == [25, 30]
    assert [r.selected for r in again] == [r.selected for r in first]
    assert [r.map for r in again] == pytest.approx([r.map for r in first])
    assert not list(tmp_path.rglob("*.tmp"))


def test_each_record_names_the_machine_that_trained_it(tmp_path) -> None:
    settings = SimulationSettings(initial=10, budget=5, rounds=2, strategies=("random",))
    run_simulation(ToyLearner(60), settings, store=RoundStore(tmp_path), machine="first")
    RoundStore(tmp_path).path("random", 0, 2).unlink()
    again = run_simulation(ToyLearner(60), settings, store=RoundStore(tmp_path), machine="second")
    assert [r.machine for r in again] == ["first", "first", "second"]
    assert RoundStore(tmp_path).load("random", 0, 2).machine == "second"  # type: ignore[union-attr]




class Chained(ToyLearner):
    """A toy learner whose state remembers the chain of labeled-set sizes it was trained from."""

    def __init__(self) -> None:
        super().__init__(60)
        self.starts: list[tuple[int, tuple[int, ...] | None]] = []

    def train(self, labeled: np.ndarray, *, seed: int, previous: Any = None) -> ToyState:
        self.starts.append((len(labeled), None if previous is None else previous.chain))
        state = super().train(labeled, seed=seed)
        chain = (*(previous.chain if previous is not None else ()), len(labeled))
        return ChainState(state.evidence, state.seed, chain)


@dataclass(frozen=True)
class ChainState(ToyState):
    chain: tuple[int, ...] = ()


def test_a_warm_curve_trains_each_round_from_its_own_previous_round(tmp_path: Path) -> None:
    settings = SimulationSettings(initial=10, budget=5, rounds=3, strategies=("random", "entropy_max"),
                                  warm=True)
    learner = Chained()
    run_simulation(learner, settings, store=RoundStore(tmp_path))
    # round 0 once (shared), then each strategy's rounds 1..3, each from its own round before
    assert learner.starts == [(10, None)] + [(15, (10,)), (20, (10, 15)), (25, (10, 15, 20))] * 2
    assert not list(tmp_path.rglob("*.state.pkl"))  # a finished curve keeps no model state
    cold = Chained()
    run_simulation(cold, SimulationSettings(initial=10, budget=5, rounds=3, strategies=("random",)))
    assert [previous for _, previous in cold.starts] == [None] * 4


def test_a_killed_warm_curve_resumes_from_the_stored_state_of_its_last_round(tmp_path: Path) -> None:
    settings = SimulationSettings(initial=10, budget=5, rounds=4, strategies=("random",), warm=True)
    store = RoundStore(tmp_path)
    first = run_simulation(Chained(), settings, store=store)
    # as if killed after round 2: rounds 3 and 4 gone, round 2's state still there (saved before its record)
    for r in (3, 4):
        store.path("random", 0, r).unlink()
    store.save_state("random", 0, 2, ChainState(np.zeros(3), 2, (10, 15, 20)))
    again_learner = Chained()
    again = run_simulation(again_learner, settings, store=store)
    assert again_learner.starts == [(25, (10, 15, 20)), (30, (10, 15, 20, 25))]
    assert [r.selected for r in again] == [r.selected for r in first]
    assert not list(tmp_path.rglob("*.state.pkl"))
    with pytest.raises(ValueError, match="trained warm; this run trains from scratch: use another store"):
        run_simulation(Chained(), SimulationSettings(initial=10, budget=5, rounds=4, strategies=("random",)),
                       store=store)
    store.path("random", 0, 4).unlink()
    with pytest.raises(ValueError, match=r"round003\.state\.pkl is missing"):
        run_simulation(Chained(), settings, store=store)
    assert all(r.warm == (r.round > 0) for r in again)


def test_a_candidate_rule_ranks_its_subset_and_carries_the_next_best_as_the_service_does() -> None:
    from magral_core.method.candidates import CandidateRule

    rule = CandidateRule(above=20, factor=2, carry=3)
    settings = SimulationSettings(initial=10, budget=5, rounds=3, strategies=("entropy_max",), seeds=(0,),
                                  candidates=rule)
    seen: list[np.ndarray] = []
    base = make_factory()

    def factory(name: str, context: RoundContext):  # type: ignore[no-untyped-def]
        seen.append(context.unlabeled.copy())
        return base(name, context)

    records = run_curve(ToyLearner(60), "entropy_max", 0, settings, factory=factory)
    # 50, 45 and 40 unlabeled: 10 random + the 3 carried (none in round 0)
    assert [r.ranked for r in records] == [10, 13, 13, 0]
    for before, after, offered in zip(records, records[1:], seen[1:], strict=False):
        assert len(before.carried) == 3 and set(before.carried) <= set(offered.tolist())
        assert not set(before.carried) & set(before.selected)
        assert set(after.selected) <= set(offered.tolist())
    whole = run_curve(ToyLearner(60), "entropy_max", 0, SimulationSettings(
        initial=10, budget=5, rounds=1, strategies=("entropy_max",), seeds=(0,), candidates=None))
    assert whole[0].ranked == 50 and whole[0].carried == []
