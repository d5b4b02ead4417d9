"""Curves in parallel processes: the task plan, and `magral simulate --jobs 2` giving exactly the records of
`--jobs 1` on the toy learner, resuming from either's store."""

from __future__ import annotations

import json

import pytest


def test_plan_tasks_spreads_seeds_before_strategies() -> None:
    from magral_core.simulation import plan_tasks

    names = ("random", "ppal", "coreset")
    assert plan_tasks(names, (0, 1, 2), 2) == [(0, names), (1, names), (2, names)]
    assert plan_tasks(names, (0,), 2) == [(0, ("random", "ppal")), (0, ("coreset",))]
    assert plan_tasks(names, (0, 1), 4) == [(0, ("random", "ppal")), (0, ("coreset",)),
                                            (1, ("random", "ppal")), (1, ("coreset",))]
    assert plan_tasks(names, (7,), 10) == [(7, ("random",)), (7, ("ppal",)), (7, ("coreset",))]
    assert plan_tasks(names, (0, 1), 1) == [(0, names), (1, names)]
    with pytest.raises(ValueError, match="jobs >= 1"):
        plan_tasks(names, (0,), 0)


def _records(path) -> list[dict]:
    """The records of a results.json without their timings and machine (its thread count differs between
    the serial run and the one-thread workers)."""
    out = []
    for rec in json.loads((path / "results.json").read_text())["records"]:
        rec.pop("seconds"), rec.pop("times")
        assert "; torch " in rec.pop("machine")
        out.append(rec)
    return out


def test_two_jobs_give_exactly_the_records_of_one(tmp_path, monkeypatch) -> None:
    from magral_core.cli import main

    monkeypatch.setenv("MAGRAL_POLICY_EPISODES", "10")
    monkeypatch.setenv("MAGRAL_LUT_RECORDS", "6")
    argv = ["simulate", "--learner", "toy", "--toy-pool", "40", "--strategies", "random,ppal,magral",
            "--seeds", "0,1", "--initial", "5", "--budget", "5", "--rounds", "2"]
    assert main([*argv, "--jobs", "1", "--out", str(tmp_path / "one")]) == 0
    assert main([*argv, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert len(one) == 3 * 2 * 3 and one == two
    assert [(r["strategy"], r["seed"], r["round"]) for r in two] == [
        (s, seed, r) for s in ("random", "ppal", "magral") for seed in (0, 1) for r in range(3)]
    # resumable either way: a finished store is reused as it is, a missing round is recomputed the same
    before = (tmp_path / "one" / "results.csv").read_text()
    assert main([*argv, "--jobs", "2", "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "results.csv").read_text() == before
    (tmp_path / "two" / "rounds" / "ppal" / "seed1" / "round002.json").unlink()
    assert main([*argv, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    assert _records(tmp_path / "two") == one
    assert main([*argv, "--jobs", "0", "--out", str(tmp_path / "zero")]) == 2
    # the store may lie outside the output directory, which then holds only the report files
    assert main([*argv, "--store", str(tmp_path / "one" / "rounds"), "--out", str(tmp_path / "results")]) == 0
    assert not (tmp_path / "results" / "rounds").exists() and _records(tmp_path / "results") == one
