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
import sys
from pathlib import Path
from typing import Any

from benchmarks.paired_runs import REPO, paired, paired_markdown, run_side_by_side, simulate_command

DEFAULT_DATA = REPO.parent / "shared" / "data" / "bccd"
DEFAULT_OUT = REPO / "docs" / "results" / "candidates_bccd"
VARIANTS = ("full", "subset")


def variant_command(args: argparse.Namespace, variant: str) -> tuple[list[str], dict[str, str]]:
    """The `magral simulate` command line and environment of one variant."""
    env = ({"MAGRAL_CANDIDATES_ABOVE": "0", "MAGRAL_CANDIDATE_FACTOR": str(args.factor),
            "MAGRAL_CANDIDATE_CARRY": str(args.carry)} if variant == "subset"
           else {"MAGRAL_CANDIDATES_ABOVE": str(10**9)})
    return simulate_command(data=args.data, strategy=args.strategy, seeds=args.seeds, budget=args.budget,
                            rounds=args.rounds, store=args.store / variant, out=args.out / variant, env=env)


def run(args: argparse.Namespace) -> int:
    if run_side_by_side({v: variant_command(args, v) for v in VARIANTS}):
        return 1
    return report(args)


def report(args: argparse.Namespace) -> int:
    from magral_core.atomic import atomic_open
    from magral_core.simulation.reports import load_results

    loaded = {v: load_results(args.out / v / "results.json")[0] for v in VARIANTS}
    strategies = {r.strategy for recs in loaded.values() for r in recs}
    if len(strategies) != 1:
        raise SystemExit(f"expected one strategy in both runs, found {sorted(strategies)}")
    result = paired(loaded["full"], loaded["subset"], strategies.pop(), VARIANTS)
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                          if k in ("strategy", "seeds", "budget", "rounds", "factor", "carry")}
    with atomic_open(args.out / "candidates.json", "w") as handle:
        json.dump(result, handle, indent=1)
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The paired differences per round and the time figures as Markdown."""
    lines = paired_markdown(result, VARIANTS)
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
