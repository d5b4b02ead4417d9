"""Two variants of `magral simulate` run side by side and compared pair by pair.

Both variants run the same strategy and seeds (so the same initial sets and round-0 model), each in its own
`magral simulate` process of one torch thread (`run_side_by_side`); `paired` reads their records and gives,
per round, the variant's test-mAP difference to the baseline with its 95% interval over the seeds, the mean
over rounds 1.., the paired area under the curve, and per variant the seconds a round spends; `dispatch` is
what such a benchmark's command line does. Used by `benchmarks.candidates`, `benchmarks.curve_cost` and
`benchmarks.trunk_cache`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLI = "import sys; from magral_core.cli import main; sys.exit(main())"
AFTER_TRAINING = ("features", "fit_strategy", "select")


def simulate_command(
    *, data: Path, strategy: str, seeds: str, budget: int, rounds: int, store: Path, out: Path,
    flags: Sequence[str] = (), env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """A one-thread `magral simulate` command line with extra `flags`, and its environment (`env` added)."""
    environment = dict(os.environ, MAGRAL_THREADS="1", OMP_NUM_THREADS="1", **(env or {}))
    command = [sys.executable, "-c", CLI, "simulate", "--data", str(data), "--strategies", strategy,
               "--seeds", seeds, "--budget", str(budget), "--rounds", str(rounds), "--store", str(store),
               "--out", str(out), "--no-progress", *flags]
    return command, environment


def run_side_by_side(commands: Mapping[str, tuple[list[str], dict[str, str]]]) -> int:
    """Start every (command, environment) at once from the repository root; 0 when all exit 0."""
    processes = []
    for name, (command, env) in commands.items():
        print(f"{name}: {' '.join(command)}", flush=True)
        processes.append(subprocess.Popen(command, env=env, cwd=REPO))
    codes = [p.wait() for p in processes]
    if any(codes):
        print(f"simulate exited with {codes}", file=sys.stderr)
        return 1
    return 0


def paired(base: list[Any], other: list[Any], strategy: str, names: tuple[str, str]) -> dict[str, Any]:
    """`other` − `base` (RoundRecords of one `strategy`, variants named `names`) per round and over rounds,
    and per variant its seconds, images ranked and mean mAP per round."""
    from magral_core.simulation.statistics import paired_areas, paired_differences, paired_gain_over_rounds

    name = f"{strategy}+{names[1]}"
    records = [*base, *(replace(r, strategy=name) for r in other)]
    per_round = paired_differences(records, baseline=strategy)[name]
    out: dict[str, Any] = {
        "difference": f"{names[1]} - {names[0]}, test mAP (0-1)",
        "per_round": {str(r): {"n_labeled": labeled, **asdict(interval)}
                      for r, (labeled, interval) in per_round.items()},
        "gain_over_rounds": asdict(paired_gain_over_rounds(records, baseline=strategy)[name]),
        "area": asdict(paired_areas(records, baseline=strategy)[name]),
    }
    for variant, recs in zip(names, (base, other), strict=True):
        ranking = [r for r in recs if r.selected]
        seeds = sorted({r.seed for r in recs})
        out[variant] = {
            "curves": len(seeds),
            "seconds_after_training_per_round": float(np.mean(
                [sum(r.times.get(k, 0.0) for k in AFTER_TRAINING) for r in ranking])),
            "train_seconds_per_round": float(np.mean([r.times.get("train", 0.0) for r in recs])),
            "curve_seconds": {str(s): float(sum(r.seconds for r in recs if r.seed == s)) for s in seeds},
            "ranked_per_round": {str(rnd): float(np.mean([r.ranked for r in ranking if r.round == rnd]))
                                 for rnd in sorted({r.round for r in ranking})},
            "map_per_round": {str(rnd): float(np.mean([r.map for r in recs if r.round == rnd]))
                              for rnd in sorted({r.round for r in recs})},
        }
    return out


def paired_markdown(result: dict[str, Any], names: tuple[str, str]) -> list[str]:
    """The per-round table and the over-rounds line of a `paired` result."""
    lines = [f"| round | labeled | {names[1]} − {names[0]} mAP ×100 | 95% interval | seeds |",
             "|---|---|---|---|---|"]
    for r, c in result["per_round"].items():
        lines.append(f"| {r} | {c['n_labeled']:.0f} | {100 * c['mean']:+.2f} | "
                     f"[{100 * c['low']:+.2f}, {100 * c['high']:+.2f}] | {c['n']} |")
    g, a = result["gain_over_rounds"], result["area"]
    lines += ["", f"Mean over rounds 1..: {100 * g['mean']:+.2f} "
              f"[{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]"
              f" (n = {g['n']}); area under the curve: {100 * a['mean']:+.2f} "
              f"[{100 * a['low']:+.2f}, {100 * a['high']:+.2f}].", ""]
    return lines


def load_variants(out: Path, variants: tuple[str, str]) -> tuple[dict[str, list[Any]], str]:
    """The RoundRecords of `<out>/<variant>/results.json` per variant and their one strategy."""
    from magral_core.simulation.reports import load_results

    loaded = {v: load_results(out / v / "results.json")[0] for v in variants}
    strategies = {r.strategy for recs in loaded.values() for r in recs}
    if len(strategies) != 1:
        raise SystemExit(f"expected one strategy in both runs, found {sorted(strategies)}")
    return loaded, strategies.pop()


def write_result(path: Path, result: dict[str, Any]) -> None:
    from magral_core.atomic import atomic_open

    with atomic_open(path, "w") as handle:
        json.dump(result, handle, indent=1)


def variant_parser(
    doc: str | None, *, out: Path, store: Path, strategy: str, seeds: str, table: str
) -> tuple[argparse.ArgumentParser, list[argparse.ArgumentParser]]:
    """The `run` / `report` command line both paired benchmarks share; add their own flags to the
    returned sub-parsers."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    sub = parser.add_subparsers(dest="command", required=True)
    subs = []
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=out, help="output directory")
        p.add_argument("--markdown", action="store_true", help=f"print the table of <out>/{table}")
        p.add_argument("--strategy", default=strategy)
        p.add_argument("--seeds", default=seeds)
        p.add_argument("--budget", type=int, default=20)
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "bccd")
        p.add_argument("--store", type=Path, default=store, help="where the rounds are stored (resumed)")
        subs.append(p)
    return parser, subs


VariantCommand = Callable[[argparse.Namespace, str], tuple[list[str], dict[str, str]]]


def dispatch(
    args: argparse.Namespace,
    *,
    variants: tuple[str, str],
    command: VariantCommand,
    analyse: Callable[[list[Any], list[Any], str], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
    table: str,
    settings: tuple[str, ...],
) -> int:
    """A paired benchmark's command line (`variant_parser`): with `--markdown`, print `markdown` of
    <out>/<table>; `run` runs both variants side by side (`command(args, variant)`), then reports; `report`
    reads both runs, writes `analyse(first, second, strategy)` with the `settings` flags to <out>/<table>
    and prints its `markdown`."""
    path = args.out / table
    if args.markdown:
        print(markdown(json.loads(path.read_text())))
        return 0
    if args.command == "run" and run_side_by_side({v: command(args, v) for v in variants}):
        return 1
    loaded, strategy = load_variants(args.out, variants)
    result = analyse(loaded[variants[0]], loaded[variants[1]], strategy)
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                          if k in settings}
    write_result(path, result)
    print(markdown(result))
    return 0
