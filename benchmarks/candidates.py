"""What ranking a candidate subset costs in mAP against ranking the whole pool, and what it saves: paired
curves of one strategy on BCCD (the same seeds, so the same initial sets and round-0 model).

    python -m benchmarks.candidates run [--data DIR] [--strategy entropy_max] [--seeds 0,1,2] [--budget 20]
        [--rounds 5] [--factor 2] [--carry 20] [--store DIR] [--out DIR]
    python -m benchmarks.candidates report [--out DIR] [--markdown]

`run` starts two `magral simulate` processes side by side, one torch thread each: `full` ranks every
unlabeled image (`MAGRAL_CANDIDATES_ABOVE` above the pool), `subset` ranks the candidates of
`method.candidates` from the first round on (`MAGRAL_CANDIDATES_ABOVE=0`, `MAGRAL_CANDIDATE_FACTOR`
`--factor`, `MAGRAL_CANDIDATE_CARRY` `--carry`). Their rounds are stored under `--store` (resumed) and their
reports written to `<out>/full` and `<out>/subset`. `report` reads the two results.json and writes
`<out>/candidates.json`: per round subset − full test mAP (mean and 95% interval over the seeds), the mean
over rounds 1.., the paired area under the curve, and per variant the seconds a round spends after training
(features of the ranked images, fitting and ranking) and the images it ranked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "bccd"
DEFAULT_OUT = REPO / "docs" / "results" / "candidates_bccd"
VARIANTS = ("full", "subset")
AFTER_TRAINING = ("features", "fit_strategy", "select")
CLI = "import sys; from magral_core.cli import main; sys.exit(main())"


def simulate_command(args: argparse.Namespace, variant: str) -> tuple[list[str], dict[str, str]]:
    """The `magral simulate` command line and environment of one variant."""
    env = dict(os.environ, MAGRAL_THREADS="1", OMP_NUM_THREADS="1")
    if variant == "subset":
        env.update(MAGRAL_CANDIDATES_ABOVE="0", MAGRAL_CANDIDATE_FACTOR=str(args.factor),
                   MAGRAL_CANDIDATE_CARRY=str(args.carry))
    else:
        env["MAGRAL_CANDIDATES_ABOVE"] = str(10**9)
    command = [sys.executable, "-c", CLI, "simulate", "--data", str(args.data),
               "--strategies", args.strategy, "--seeds", args.seeds, "--budget", str(args.budget),
               "--rounds", str(args.rounds), "--store", str(args.store / variant),
               "--out", str(args.out / variant), "--no-progress"]
    return command, env


def run(args: argparse.Namespace) -> int:
    processes = []
    for variant in VARIANTS:
        command, env = simulate_command(args, variant)
        print(f"{variant}: {' '.join(command)}", flush=True)
        processes.append(subprocess.Popen(command, env=env, cwd=REPO))
    codes = [p.wait() for p in processes]
    if any(codes):
        print(f"simulate exited with {codes}", file=sys.stderr)
        return 1
    return report(args)


def analyse(full: list[Any], subset: list[Any], strategy: str) -> dict[str, Any]:
    """The paired figures of `subset` against `full` (RoundRecords of one strategy)."""
    from magral_core.simulation.statistics import paired_areas, paired_differences, paired_gain_over_rounds

    name = f"{strategy}+candidates"
    records = [*full, *(replace(r, strategy=name) for r in subset)]
    per_round = paired_differences(records, baseline=strategy)[name]
    out: dict[str, Any] = {
        "difference": "subset - full, test mAP (0-1)",
        "per_round": {str(r): {"n_labeled": labeled, **asdict(interval)}
                      for r, (labeled, interval) in per_round.items()},
        "gain_over_rounds": asdict(paired_gain_over_rounds(records, baseline=strategy)[name]),
        "area": asdict(paired_areas(records, baseline=strategy)[name]),
    }
    for variant, recs in (("full", full), ("subset", subset)):
        ranking = [r for r in recs if r.selected]
        out[variant] = {
            "curves": len({r.seed for r in recs}),
            "seconds_after_training_per_round": float(np.mean(
                [sum(r.times.get(k, 0.0) for k in AFTER_TRAINING) for r in ranking])),
            "train_seconds_per_round": float(np.mean([r.times.get("train", 0.0) for r in recs])),
            "ranked_per_round": {str(rnd): float(np.mean([r.ranked for r in ranking if r.round == rnd]))
                                 for rnd in sorted({r.round for r in ranking})},
            "map_per_round": {str(rnd): float(np.mean([r.map for r in recs if r.round == rnd]))
                              for rnd in sorted({r.round for r in recs})},
        }
    return out


def report(args: argparse.Namespace) -> int:
    from magral_core.atomic import atomic_open
    from magral_core.simulation.reports import load_results

    loaded = {v: load_results(args.out / v / "results.json")[0] for v in VARIANTS}
    strategies = {r.strategy for recs in loaded.values() for r in recs}
    if len(strategies) != 1:
        raise SystemExit(f"expected one strategy in both runs, found {sorted(strategies)}")
    result = analyse(loaded["full"], loaded["subset"], strategies.pop())
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                          if k in ("strategy", "seeds", "budget", "rounds", "factor", "carry")}
    with atomic_open(args.out / "candidates.json", "w") as handle:
        json.dump(result, handle, indent=1)
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The paired differences per round and the time figures as Markdown."""
    lines = ["| round | labeled | subset − full mAP ×100 | 95% interval | seeds |", "|---|---|---|---|---|"]
    for r, c in result["per_round"].items():
        lines.append(f"| {r} | {c['n_labeled']:.0f} | {100 * c['mean']:+.2f} | "
                     f"[{100 * c['low']:+.2f}, {100 * c['high']:+.2f}] | {c['n']} |")
    g, a = result["gain_over_rounds"], result["area"]
    lines += ["", f"Mean over rounds 1..: {100 * g['mean']:+.2f} "
              f"[{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]"
              f" (n = {g['n']}); area under the curve: {100 * a['mean']:+.2f} "
              f"[{100 * a['low']:+.2f}, {100 * a['high']:+.2f}].", ""]
    for variant in VARIANTS:
        v = result[variant]
        ranked = ", ".join(f"{n:.0f}" for n in v["ranked_per_round"].values())
        lines.append(f"- {variant}: {v['seconds_after_training_per_round']:.1f} s per round after training "
                     f"(train {v['train_seconds_per_round']:.1f} s); images ranked per round: {ranked}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
        p.add_argument("--markdown", action="store_true", help="print the table of <out>/candidates.json")
        p.add_argument("--strategy", default="entropy_max")
        p.add_argument("--seeds", default="0,1,2")
        p.add_argument("--budget", type=int, default=20)
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--factor", type=int, default=2, help="k: random candidates = k · budget")
        p.add_argument("--carry", type=int, default=20, help="previous round's best-ranked carried")
        p.add_argument("--data", type=Path, default=DEFAULT_DATA)
        p.add_argument("--store", type=Path, default=REPO / "runs" / "candidates",
                       help="where the rounds are stored (resumed)")
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.markdown:
        print(markdown(json.loads((args.out / "candidates.json").read_text())))
        return 0
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
