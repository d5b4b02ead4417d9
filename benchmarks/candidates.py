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
import sys
from typing import Any

from benchmarks.paired_runs import REPO, dispatch, paired, paired_markdown, simulate_command, variant_parser

DEFAULT_OUT = REPO / "docs" / "results" / "candidates_bccd"
VARIANTS = ("full", "subset")


def variant_command(args: argparse.Namespace, variant: str) -> tuple[list[str], dict[str, str]]:
    """The `magral simulate` command line and environment of one variant."""
    env = ({"MAGRAL_CANDIDATES_ABOVE": "0", "MAGRAL_CANDIDATE_FACTOR": str(args.factor),
            "MAGRAL_CANDIDATE_CARRY": str(args.carry)} if variant == "subset"
           else {"MAGRAL_CANDIDATES_ABOVE": str(10**9)})
    return simulate_command(data=args.data, strategy=args.strategy, seeds=args.seeds, budget=args.budget,
                            rounds=args.rounds, store=args.store / variant, out=args.out / variant, env=env)


def analyse(full: list[Any], subset: list[Any], strategy: str) -> dict[str, Any]:
    """`paired` figures of the subset curves against the full ones."""
    return paired(full, subset, strategy, VARIANTS)


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
    parser, subs = variant_parser(__doc__, out=DEFAULT_OUT, store=REPO / "runs" / "candidates",
                                  strategy="entropy_max", seeds="0,1,2", table="candidates.json")
    for p in subs:
        p.add_argument("--factor", type=int, default=2, help="k: random candidates = k · budget")
        p.add_argument("--carry", type=int, default=20, help="previous round's best-ranked carried")
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return dispatch(args, variants=VARIANTS, command=variant_command, analyse=analyse, markdown=markdown,
                    table="candidates.json",
                    settings=("strategy", "seeds", "budget", "rounds", "factor", "carry"))

if __name__ == "__main__":
    sys.exit(main())
