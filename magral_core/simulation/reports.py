"""Reports of active-learning curves: per-round summaries over seeds, paired differences to a baseline
(`statistics`), labeled images needed to reach a target mAP, Markdown tables, and the files a run leaves
(JSON, CSV, Markdown, PNG).

`summarise`, `labels_to_reach`, `markdown_table`, `analyse` and `render_markdown` are pure; `write_reports`
and the plots write files. `python -m magral_core.simulation --markdown DIR` prints the Markdown of
DIR/results.json: the tables in README are that output, not typed.

Kept as one module because every file and table of a run is rendered from the same `analyse` figures, so
they cannot disagree.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.simulation.protocol import Metrics, RoundRecord, write_atomic
from magral_core.simulation.statistics import (
    Interval,
    areas,
    paired_areas,
    paired_differences,
    paired_gain_over_rounds,
    policy_response_by_round,
    round_zero_spread,
    t_interval,
)


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


TARGET_FRACTIONS = (0.90, 0.95)
"""Fractions of the full-pool mAP whose labels-to-reach are reported."""


def full_pool_targets(full_pool: Metrics | None) -> dict[str, float]:
    """{"0.90": 0.9 × full-pool mAP, "0.95": ...}; {} without a full-pool run."""
    return {f"{f:.2f}": f * full_pool.map for f in TARGET_FRACTIONS} if full_pool else {}


def analyse(
    records: Sequence[RoundRecord], *, full_pool: Metrics | None = None, baseline: str = "random"
) -> dict[str, Any]:
    """Everything the reports say, as JSON-ready values (dict keys become strings in JSON): per-round
    summaries, the paired differences to `baseline` per round, the areas and their paired differences, the
    paired gain averaged over rounds 1.., and labels to reach each `TARGET_FRACTIONS` of the full-pool mAP."""

    def interval(x: Interval) -> dict[str, float]:
        return {"mean": x.mean, "low": x.low, "high": x.high, "seeds": x.n}

    area = areas(records)
    return {
        "baseline": baseline,
        "summary": summarise(records),
        "paired": {name: {r: {"n_labeled": n, **interval(x)} for r, (n, x) in rounds.items()}
                   for name, rounds in paired_differences(records, baseline).items()},
        "area": {name: {"per_seed": per_seed, **interval(t_interval(list(per_seed.values())))}
                 for name, per_seed in area.items()},
        "area_paired": {name: interval(x) for name, x in paired_areas(records, baseline).items()},
        "gain_over_rounds": {name: interval(x)
                             for name, x in paired_gain_over_rounds(records, baseline).items()},
        "full_pool": asdict(full_pool) if full_pool else None,
        "labels_to_reach": {key: labels_to_reach(records, target)
                            for key, target in full_pool_targets(full_pool).items()},
        "policy_response": policy_response_by_round(records),
        "round0_spread": round_zero_spread(records),
    }


def _pm(x: float, scale: float = 100.0) -> str:
    return "—" if math.isnan(x) else f"{scale * x:+.2f}"


def _ci(cell: dict[str, float]) -> str:
    """"+1.23 [−0.40, +2.86]" (× 100) or "+1.23" with one seed."""
    if math.isnan(cell["low"]):
        return _pm(cell["mean"])
    return f"{_pm(cell['mean'])} [{_pm(cell['low'])}, {_pm(cell['high'])}]"


def render_markdown(
    records: Sequence[RoundRecord], *, full_pool: Metrics | None = None, baseline: str = "random"
) -> str:
    """The summary of a run as Markdown (the text of summary.md, and of the README's tables): mAP per round,
    paired differences to the baseline with their 95% intervals, areas, labels to reach the full-pool
    targets, AP50 per round. Computed from the records alone, so the same records give the same text."""
    result = analyse(records, full_pool=full_pool, baseline=baseline)
    seeds = sorted({r.seed for r in records})
    text = (f"Test mAP@[.5:.95] × 100, mean ± std over {len(seeds)} seed(s) "
            f"({', '.join(map(str, seeds))}).\n\n" + markdown_table(result["summary"]))
    paired = result["paired"]
    if paired:
        names = sorted(paired)
        rounds = sorted({r for v in paired.values() for r in v})
        text += (f"\nPaired difference to {baseline} (same seed, same initial set), mAP × 100: mean "
                 "[95% t interval over seeds].\n\n| round | labeled | " + " | ".join(names) + " |\n"
                 + "|---|---|" + "---|" * len(names) + "\n")
        for r in rounds:
            labeled = next(int(paired[n][r]["n_labeled"]) for n in names if r in paired[n])
            text += f"| {r} | {labeled} | " + " | ".join(_ci(paired[n][r]) if r in paired[n] else ""
                                                         for n in names) + " |\n"
        gain = result["gain_over_rounds"]
        text += f"| 1–{rounds[-1]} | mean | " + " | ".join(_ci(gain[n]) for n in names) + " |\n"
        text += _reproducibility_note(result["round0_spread"])
    text += ("\nArea under the curve (mAP over labeled images, trapezoid, divided by the labeled range) "
             f"× 100: mean [95% interval]; paired: minus {baseline}'s under the same seed.\n\n"
             "| strategy | area | paired area |" + "".join(f" labels to {float(k):.0%} |"
                                                     for k in result["labels_to_reach"]) + "\n"
             + "|---|---|---|" + "---|" * len(result["labels_to_reach"]) + "\n")
    for name in sorted(result["area"]):
        area = result["area"][name]
        cell = f"{100 * area['mean']:.2f}" + ("" if math.isnan(area["low"]) else
                                             f" [{100 * area['low']:.2f}, {100 * area['high']:.2f}]")
        paired_area = _ci(result["area_paired"][name]) if name in result["area_paired"] else "—"
        reach = ["/".join("—" if v is None else str(v) for _, v in sorted(per[name].items()))
                 for per in result["labels_to_reach"].values()]
        text += f"| {name} | {cell} | {paired_area} |" + "".join(f" {x} |" for x in reach) + "\n"
    for name, rounds_of in result["policy_response"].items():
        text += (f"\nDoes {name}'s batch answer to its reward? Images (of the batch) it shares with the "
                 "untrained controller's batch and with the batch of a controller trained on the same "
                 "records with their values permuted, mean over seeds; and the spread (std) of the record "
                 "values.\n\n"
                 "| round | batch | shared with untrained | shared with permuted | record value std × 100 |\n"
                 "|---|---|---|---|---|\n")
        for rnd, d in rounds_of.items():
            text += (f"| {rnd} | {d.get('budget', 0):.0f} | {d.get('overlap_untrained', 0):.1f} | "
                     f"{d.get('overlap_permuted', 0):.1f} | {100 * d.get('record_value_std', 0):.3f} |\n")
    if full_pool:
        text += (f"\nFull-pool model: mAP {100 * full_pool.map:.2f}, AP50 {100 * full_pool.ap50:.2f}. "
                 "Labels to reach a fraction of it: the fewest labeled images whose test mAP reaches it, "
                 "per seed (— = not reached).\n")
    return text + "\nTest AP50 × 100, mean ± std over seeds.\n\n" + markdown_table(result["summary"],
                                                                                    metric="ap50")


def _reproducibility_note(spread: dict[int, dict[str, Any]]) -> str:
    """What round 0's spread across strategies (`statistics.round_zero_spread`) says of the pairing."""
    if not spread:
        return ""
    off = {seed: v for seed, v in spread.items() if v["spread"] > 0}
    if not off:
        return ("\nRound 0 (the same initial set and training seed for every strategy) gave the same model "
                "for every strategy under each seed: the pairing holds exactly.\n")
    worst = max(v["spread"] for v in off.values())
    machines = sorted({m for v in off.values() for m in v["machines"] if m})
    where = (f"; machines recorded: {'; '.join(f'`{m}`' for m in machines)}" if machines else
             "; the records of that run do not name their machines")
    return (f"\nRound 0 (the same initial set and training seed for every strategy) differs across "
            f"strategies under seed(s) {', '.join(map(str, sorted(off)))} by up to {100 * worst:.2f} points: "
            "as when curves are resumed on another machine or a kernel is not deterministic, so their "
            f"paired differences carry that much noise beyond the seeds' own{where}.\n")


def write_reports(
    out: Path, records: Sequence[RoundRecord], *, full_pool: Metrics | None = None, baseline: str = "random"
) -> list[Path]:
    """results.json (the records, the full-pool metrics and `analyse`'s figures), results.csv (one row per
    record), paired.csv (the paired figures), summary.md (`render_markdown`), curve.png and paired.png in
    `out`; returns their paths. `load_results(out / "results.json")` gives the records back, so every table
    can be regenerated from the committed JSON."""
    out = Path(out)
    result = analyse(records, full_pool=full_pool, baseline=baseline)
    target = 0.95 * full_pool.map if full_pool else math.nan
    reach = labels_to_reach(records, target) if full_pool else {}
    payload = {"records": [asdict(r) for r in records], **result, "labels_to_95pct_full_pool": reach}
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
    paired_rows: list[list[object]] = [["strategy", "kind", "round", "n_labeled", "mean", "low", "high",
                                        "seeds"]]
    for name, rounds in result["paired"].items():
        for r, c in rounds.items():
            paired_rows.append([name, "round", r, f"{c['n_labeled']:g}", *_cells(c)])
        paired_rows.append([name, "gain_over_rounds", "", "", *_cells(result["gain_over_rounds"][name])])
        paired_rows.append([name, "area", "", "", *_cells(result["area_paired"][name])])
    with (out / "paired.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(paired_rows)

    write_atomic(out / "summary.md", "# Active-learning curves\n\n"
                 + render_markdown(records, full_pool=full_pool, baseline=baseline))
    plot_curves(out / "curve.png", result["summary"], full_pool)
    plot_paired(out / "paired.png", result["paired"], baseline)
    return [out / n for n in ("results.json", "results.csv", "paired.csv", "summary.md", "curve.png",
                              "paired.png")]


def _cells(c: dict[str, float]) -> list[str]:
    return [f"{c['mean']:.5f}", f"{c['low']:.5f}", f"{c['high']:.5f}", str(int(c["seeds"]))]


def load_results(path: Path) -> tuple[list[RoundRecord], Metrics | None, str]:
    """(records, full-pool metrics or None, baseline) of a results.json written by `write_reports`."""
    data = json.loads(Path(path).read_text())
    full = data.get("full_pool")
    return ([RoundRecord.from_dict(r) for r in data["records"]], Metrics(**full) if full else None,
            str(data.get("baseline", "random")))


def plot_paired(path: Path, paired: dict[str, dict[int, dict[str, float]]], baseline: str) -> None:
    """Paired difference to the baseline against labeled images, one line per strategy with its 95% band
    (a note instead when only the baseline ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rounds in sorted(paired.items()):
        xs = np.array([v["n_labeled"] for v in rounds.values()])
        ax.plot(xs, [100 * v["mean"] for v in rounds.values()], marker="o", label=name)
        ax.fill_between(xs, [100 * v["low"] for v in rounds.values()],
                        [100 * v["high"] for v in rounds.values()], alpha=0.15)
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.set_xlabel("labeled images")
    ax.set_ylabel(f"test mAP × 100 minus {baseline} (same seed)")
    if paired:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no strategy besides {baseline} ran: nothing to pair", ha="center",
                va="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
