"""Reports of active-learning curves: per-round summaries over seeds, labeled images needed to reach a
target mAP, a Markdown table, and the files a run leaves (JSON, CSV, Markdown, PNG).

`summarise`, `labels_to_reach` and `markdown_table` are pure; `write_reports` and `plot_curves` write files.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from magral_core.simulation.protocol import Metrics, RoundRecord, write_atomic


def summarise(records: Sequence[RoundRecord]) -> dict[str, dict[int, dict[str, float]]]:
    """{strategy: {round: {n_labeled, map_mean, map_std, ap50_mean, ap50_std, seeds}}} (std over seeds,
    population std, 0 for one seed)."""
    grouped: dict[str, dict[int, list[RoundRecord]]] = {}
    for rec in records:
        grouped.setdefault(rec.strategy, {}).setdefault(rec.round, []).append(rec)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, rounds in grouped.items():
        out[name] = {}
        for r, recs in sorted(rounds.items()):
            maps = np.array([x.map for x in recs])
            ap50 = np.array([x.ap50 for x in recs])
            out[name][r] = {
                "n_labeled": float(np.mean([x.n_labeled for x in recs])),
                "map_mean": float(maps.mean()), "map_std": float(maps.std()),
                "ap50_mean": float(ap50.mean()), "ap50_std": float(ap50.std()),
                "seeds": float(len(recs)),
            }
    return out


def labels_to_reach(records: Sequence[RoundRecord], target: float) -> dict[str, dict[int, int | None]]:
    """{strategy: {seed: fewest labeled images whose test mAP >= target, or None if never reached}}."""
    out: dict[str, dict[int, int | None]] = {}
    for rec in sorted(records, key=lambda x: (x.strategy, x.seed, x.round)):
        per_seed = out.setdefault(rec.strategy, {})
        if per_seed.get(rec.seed) is None:
            per_seed[rec.seed] = rec.n_labeled if rec.map >= target else None
    return out


def markdown_table(summary: dict[str, dict[int, dict[str, float]]], *, metric: str = "map") -> str:
    """Rows = rounds (with the labeled count), columns = strategies, cells = mean ± std × 100."""
    names = sorted(summary)
    rounds = sorted({r for s in summary.values() for r in s})
    lines = ["| round | labeled | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rounds:
        labeled = next(int(summary[n][r]["n_labeled"]) for n in names if r in summary[n])
        cells = [
            f"{100 * summary[n][r][metric + '_mean']:.2f} ± {100 * summary[n][r][metric + '_std']:.2f}"
            if r in summary[n] else "" for n in names
        ]
        lines.append(f"| {r} | {labeled} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(
    out: Path, records: Sequence[RoundRecord], *, full_pool: Metrics | None = None
) -> list[Path]:
    """results.json, results.csv, summary.md and curve.png in `out`; returns their paths."""
    out = Path(out)
    summary = summarise(records)
    target = 0.95 * full_pool.map if full_pool else math.nan
    reach = labels_to_reach(records, target) if full_pool else {}
    payload = {
        "records": [asdict(r) for r in records], "summary": summary,
        "full_pool": asdict(full_pool) if full_pool else None, "labels_to_95pct_full_pool": reach,
    }
    write_atomic(out / "results.json", json.dumps(payload, indent=1))

    classes = sorted({c for r in records for c in r.per_class_ap})
    rows: list[list[object]] = [["strategy", "seed", "round", "n_labeled", "map", "ap50", "seconds",
             *(f"ap_{c}" for c in classes), *(f"t_{k}" for k in ("train", "evaluate", "features",
                                                                   "fit_strategy", "select"))]]
    for r in records:
        rows.append([r.strategy, r.seed, r.round, r.n_labeled, f"{r.map:.5f}", f"{r.ap50:.5f}",
                     f"{r.seconds:.3f}", *(f"{r.per_class_ap.get(c, math.nan):.5f}" for c in classes),
                     *(f"{r.times.get(k, 0.0):.3f}" for k in ("train", "evaluate", "features", "fit_strategy",
                                                               "select"))])
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)

    text = "# Active-learning curves\n\nTest mAP@[.5:.95] × 100, mean ± std over seeds.\n\n"
    text += markdown_table(summary) + "\nTest AP50 × 100.\n\n" + markdown_table(summary, metric="ap50")
    if full_pool:
        text += f"\nFull-pool model: mAP {100 * full_pool.map:.2f}, AP50 {100 * full_pool.ap50:.2f}.\n"
        text += "\nLabeled images to reach 95% of the full-pool mAP (per seed; — = not reached):\n\n"
        for name, seeds in sorted(reach.items()):
            text += f"- {name}: " + ", ".join(f"seed {s}: {v if v is not None else '—'}"
                                               for s, v in sorted(seeds.items())) + "\n"
    write_atomic(out / "summary.md", text)
    plot_curves(out / "curve.png", summary, full_pool)
    return [out / "results.json", out / "results.csv", out / "summary.md", out / "curve.png"]


def plot_curves(
    path: Path, summary: dict[str, dict[int, dict[str, float]]], full_pool: Metrics | None
) -> None:
    """mAP against labeled images, one line per strategy with a ±std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rounds in sorted(summary.items()):
        xs = np.array([v["n_labeled"] for v in rounds.values()])
        mean = np.array([v["map_mean"] for v in rounds.values()])
        std = np.array([v["map_std"] for v in rounds.values()])
        ax.plot(xs, mean, marker="o", label=name)
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    if full_pool:
        ax.axhline(full_pool.map, color="k", linestyle="--", label="full pool")
        ax.axhline(0.95 * full_pool.map, color="gray", linestyle=":", label="95% of full pool")
    ax.set_xlabel("labeled images")
    ax.set_ylabel("test mAP@[.5:.95]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
