"""Summaries over seeds, labels-to-target, the Markdown table and the report files."""

from __future__ import annotations

import csv

import pytest

from magral_core.simulation import (
    Metrics,
    RoundRecord,
    labels_to_reach,
    markdown_table,
    summarise,
    write_reports,
)


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
    assert "| coreset | 30.00 | +10.00 | 10 | 10 |" in summary and "| random | 20.00 | — | — | — |" in summary


def test_a_baseline_only_run_writes_its_paired_plot_without_a_warning(tmp_path) -> None:
    import warnings

    records = [_rec("random", 0, 0, 10, 0.2), _rec("random", 0, 1, 20, 0.3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_reports(tmp_path, records)
    assert (tmp_path / "paired.png") in paths and (tmp_path / "paired.png").stat().st_size > 0
    assert list(csv.reader((tmp_path / "paired.csv").open()))[1:] == []


def test_the_summary_says_whether_round_zero_agrees_across_strategies() -> None:
    from magral_core.simulation.reports import render_markdown

    random = {(0, 0): 0.2, (0, 1): 0.3, (1, 0): 0.21, (1, 1): 0.32}

    def pair(coreset_round0: float, machine: str) -> list[RoundRecord]:
        return [_rec("random", s, r, 10 + 10 * r, v) for (s, r), v in random.items()] + [
            RoundRecord("coreset", s, r, 10 + 10 * r, v, v, {}, 1.0, {}, [], [], machine=machine)
            for s in (0, 1) for r, v in ((0, coreset_round0 if s == 1 else 0.2), (1, 0.35))]

    assert "gave the same model for every strategy" in render_markdown(pair(0.21, "m1"))
    text = render_markdown(pair(0.25, "m1"))
    assert "differs across strategies under seed(s) 1 by up to 4.00 points" in text and "`m1`" in text


def test_tables_are_regenerated_from_the_results_file(tmp_path, capsys) -> None:
    from magral_core.simulation.__main__ import main
    from magral_core.simulation.reports import load_results, render_markdown

    records = [_rec(name, seed, r, 10 + 10 * r, 0.1 * r + 0.01 * seed + (0.02 * r if name == "ppal" else 0))
               for name in ("random", "ppal") for seed in (0, 1, 2) for r in range(3)]
    write_reports(tmp_path, records, full_pool=Metrics(0.25, 0.4))
    loaded, full, baseline = load_results(tmp_path / "results.json")
    assert loaded == records and full == Metrics(0.25, 0.4) and baseline == "random"
    text = render_markdown(loaded, full_pool=full)
    assert (tmp_path / "summary.md").read_text() == "# Active-learning curves\n\n" + text
    assert "| 1 | 20 | +2.00 [+2.00, +2.00] |" in text and "| 1–2 | mean | +3.00 [+3.00, +3.00] |" in text
    assert main(["--markdown", str(tmp_path)]) == 0 and capsys.readouterr().out == text
    assert main(["--markdown", str(tmp_path / "nothing")]) == 2
    rows = list(csv.reader((tmp_path / "paired.csv").open()))
    assert rows[0] == ["strategy", "kind", "round", "n_labeled", "mean", "low", "high", "seeds"]
    assert ["ppal", "round", "2", "30", "0.04000", "0.04000", "0.04000", "3"] in rows


