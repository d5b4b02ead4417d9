"""The README's result tables are what the generators print from the committed results files, verbatim:
a figure changed by hand, or a results file re-run without regenerating the README, fails here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks import candidates, curve_cost, proxy_fidelity, trunk_cache

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _curve_summary(path: Path) -> str:
    from magral_core.simulation.reports import load_results, render_markdown

    records, full, baseline = load_results(path)
    return render_markdown(records, full_pool=full, baseline=baseline)


TABLES: list[tuple[str, Callable[[Path], str]]] = [
    ("reward_fidelity_L40.json", lambda p: proxy_fidelity.markdown(_json(p))),
    ("reward_fidelity_L80.json", lambda p: proxy_fidelity.markdown(_json(p))),
    ("reward_fidelity_L40_warm3.json", lambda p: proxy_fidelity.markdown(_json(p))),
    ("candidates_bccd/candidates.json", lambda p: candidates.markdown(_json(p))),
    ("curve_cost_bccd/curve_cost.json", lambda p: curve_cost.markdown(_json(p))),
    ("trunk_cache_bccd/trunk_cache.json", lambda p: trunk_cache.markdown(_json(p))),
    ("bccd_headline/results.json", lambda p: _curve_summary(p)),
]


@pytest.mark.parametrize(("name", "render"), TABLES, ids=[name for name, _ in TABLES])
def test_the_readme_shows_the_generated_table_of(name: str, render: Callable[[Path], str]) -> None:
    path = RESULTS / name
    assert path.is_file(), f"{path} is missing"
    table = render(path).strip()
    assert table in (REPO / "README.md").read_text(), f"README does not show the table generated from {name}"


def test_a_curve_summary_is_what_its_results_file_renders() -> None:
    from magral_core.simulation.reports import load_results, render_markdown

    for summary in sorted(RESULTS.rglob("summary.md")):
        records, full, baseline = load_results(summary.parent / "results.json")
        text = render_markdown(records, full_pool=full, baseline=baseline)
        assert summary.read_text() == "# Active-learning curves\n\n" + text, summary
