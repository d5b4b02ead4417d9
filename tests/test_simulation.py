"""The active-learning protocol's bookkeeping, its isolation of the test split, resumption and reports."""

from __future__ import annotations

import csv
import itertools
from dataclasses import fields

import numpy as np
import pytest

from magral_core.simulation import (
    Metrics,
    RoundContext,
    RoundRecord,
    RoundStore,
    SimulationSettings,
    ToyLearner,
    initial_labeled,
    labels_to_reach,
    make_factory,
    markdown_table,
    run_curve,
    run_simulation,
    summarise,
    write_reports,
)
from magral_core.strategies import Pool, make_strategy

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
        def train(self, labeled, *, seed):  # type: ignore[no-untyped-def]
            trained.append(seed)
            return super().train(labeled, seed=seed)

    records = run_simulation(Counting(60), SETTINGS)
    # per seed: round 0 once, then rounds 1..4 for each of the two strategies
    assert len(trained) == 2 * (1 + 2 * 4)
    first = [r for r in records if r.round == 0]
    assert {(r.seed, r.map) for r in first} == {(r.seed, r.map) for r in first if r.strategy == "random"}


def test_uncertainty_beats_random_on_the_toy() -> None:
    summary = summarise(run_simulation(ToyLearner(60), SETTINGS))
    assert summary["entropy_max"][4]["map_mean"] > summary["random"][4]["map_mean"]


class SpyLearner(ToyLearner):
    """A toy learner with a test split whose embeddings are huge: any leak into a Pool is visible."""

    def __init__(self) -> None:
        super().__init__(40)
        self.test_embeddings = np.full((10, self.embeddings.shape[1]), 1e6)
        self.calls: list[str] = []

    def evaluate(self, state):  # type: ignore[no-untyped-def]
        self.calls.append("evaluate")
        return super().evaluate(state)

    def pool(self, state, unlabeled, labeled):  # type: ignore[no-untyped-def]
        assert not set(unlabeled.tolist()) & set(labeled.tolist())
        assert sorted([*unlabeled.tolist(), *labeled.tolist()]) == list(range(self.pool_size))
        self.calls.append("pool")
        return super().pool(state, unlabeled, labeled)


def test_selection_never_sees_the_test_split() -> None:
    learner = SpyLearner()
    seen: list[RoundContext] = []

    class Watchful:
        name = "watchful"

        def rank(self, pool: Pool, budget: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
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
        def train(self, labeled, *, seed):  # type: ignore[no-untyped-def]
            trained.append(len(labeled))
            return super().train(labeled, seed=seed)

    again = run_simulation(Counting(60), settings, store=RoundStore(tmp_path))
    assert trained == [25, 30]
    assert [r.selected for r in again] == [r.selected for r in first]
    assert [r.map for r in again] == pytest.approx([r.map for r in first])
    assert not list(tmp_path.rglob("*.tmp"))


def _rec(strategy: str, seed: int, r: int, n: int, value: float) -> RoundRecord:
    return RoundRecord(strategy, seed, r, n, value, value + 0.1, {"a": value}, 1.0, {"train": 0.5}, [], [])


def test_summary_table_and_labels_to_reach() -> None:
    records = [_rec("random", 0, 0, 10, 0.2), _rec("random", 1, 0, 10, 0.4),
               _rec("random", 0, 1, 20, 0.5), _rec("random", 1, 1, 20, 0.45)]
    summary = summarise(records)
    assert summary["random"][0]["map_mean"] == pytest.approx(0.3)
    assert summary["random"][0]["map_std"] == pytest.approx(0.1)
    table = markdown_table(summary)
    assert "| 0 | 10 | 30.00 ± 10.00 |" in table and "| 1 | 20 | 47.50 ± 2.50 |" in table
    assert labels_to_reach(records, 0.41) == {"random": {0: 20, 1: 20}}
    assert labels_to_reach(records, 0.39) == {"random": {0: 20, 1: 10}}
    assert labels_to_reach(records, 0.6) == {"random": {0: None, 1: None}}


def test_reports_are_written(tmp_path) -> None:
    records = [_rec("random", 0, 0, 10, 0.2), _rec("coreset", 0, 0, 10, 0.3)]
    paths = write_reports(tmp_path, records, full_pool=Metrics(0.3, 0.5))
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    rows = list(csv.reader((tmp_path / "results.csv").open()))
    assert rows[0][:6] == ["strategy", "seed", "round", "n_labeled", "map", "ap50"] and len(rows) == 3
    summary = (tmp_path / "summary.md").read_text()
    assert "- coreset: seed 0: 10" in summary and "- random: seed 0: —" in summary


def test_command_line_runs_the_toy_protocol_and_resumes(tmp_path, capsys) -> None:
    from magral_core.cli import main

    argv = ["simulate", "--learner", "toy", "--toy-pool", "40", "--strategies", "random,coreset",
            "--seeds", "0", "--initial", "5", "--budget", "5", "--rounds", "2", "--full-pool",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "results.csv", "summary.md", "curve.png"}
    assert len(list((tmp_path / "rounds").rglob("round*.json"))) == 2 * 3
    first = (tmp_path / "results.csv").read_text()
    assert main(argv) == 0 and (tmp_path / "results.csv").read_text() == first
    assert main([*argv[:6], "bald", *argv[7:]]) == 2
    assert "unknown ['bald']" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path)]) == 2  # the detector learner needs --data
