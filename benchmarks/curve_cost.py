"""What a curve costs and reaches when its rounds warm-start, against the paper's protocol of training every
round from the ImageNet trunk: paired curves of one strategy on BCCD (the same seeds, so the same initial
sets and round-0 model).

    python -m benchmarks.curve_cost run [--data DIR] [--strategy random] [--seeds 0] [--budget 20]
        [--rounds 5] [--warm-epochs 3] [--store DIR] [--out DIR]
    python -m benchmarks.curve_cost report [--out DIR] [--markdown]

`run` starts two `magral simulate` processes side by side, one torch thread each: `cold` trains every round
from the ImageNet trunk for `MAGRAL_EPOCHS` epochs, `warm` (`--warm-start`) trains each round after the first
from its curve's previous model for `MAGRAL_WARM_EPOCHS` = `--warm-epochs` epochs, as the service's rounds
can. Rounds are stored under `--store` (resumed), reports written to `<out>/cold` and `<out>/warm`. `report`
writes `<out>/curve_cost.json`: per round warm − cold test mAP (mean and 95% interval over the seeds), the
mean over rounds 1.., the paired area, and per seed each variant's curve wall time (every round's training,
evaluation, features and ranking; round 0 is the same model in both) and their ratio.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks.paired_runs import REPO, dispatch, paired, paired_markdown, simulate_command, variant_parser

DEFAULT_OUT = REPO / "docs" / "results" / "curve_cost_bccd"
VARIANTS = ("cold", "warm")


def variant_command(args: argparse.Namespace, variant: str) -> tuple[list[str], dict[str, str]]:
    """The `magral simulate` command line and environment of one variant."""
    warm = variant == "warm"
    return simulate_command(data=args.data, strategy=args.strategy, seeds=args.seeds, budget=args.budget,
                            rounds=args.rounds, store=args.store / variant, out=args.out / variant,
                            flags=("--warm-start",) if warm else (),
                            env={"MAGRAL_WARM_EPOCHS": str(args.warm_epochs)} if warm else {})


def analyse(cold: list[Any], warm: list[Any], strategy: str) -> dict[str, Any]:
    """`paired` figures plus each seed's warm / cold curve-time ratio."""
    result = paired(cold, warm, strategy, VARIANTS)
    result["time_ratio"] = {seed: result["warm"]["curve_seconds"][seed] / seconds
                            for seed, seconds in result["cold"]["curve_seconds"].items()}
    return result


def markdown(result: dict[str, Any]) -> str:
    """The paired differences per round and the curve times as Markdown."""
    lines = paired_markdown(result, VARIANTS)
    lines += ["| seed | cold curve s | warm curve s | warm / cold |", "|---|---|---|---|"]
    for seed, ratio in result["time_ratio"].items():
        lines.append(f"| {seed} | {result['cold']['curve_seconds'][seed]:.0f} | "
                     f"{result['warm']['curve_seconds'][seed]:.0f} | {ratio:.2f} |")
    for variant in VARIANTS:
        v = result[variant]
        maps = ", ".join(f"{100 * m:.1f}" for m in v["map_per_round"].values())
        lines.append(f"\n- {variant}: train {v['train_seconds_per_round']:.1f} s per round; mean test "
                     f"mAP ×100 per round: {maps}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser, subs = variant_parser(__doc__, out=DEFAULT_OUT, store=REPO / "runs" / "curve_cost",
                                  strategy="random", seeds="0", table="curve_cost.json")
    for p in subs:
        p.add_argument("--warm-epochs", type=int, default=3, help="MAGRAL_WARM_EPOCHS of the warm curves")
    return dispatch(parser.parse_args(argv), variants=VARIANTS, command=variant_command, analyse=analyse,
                    markdown=markdown, table="curve_cost.json",
                    settings=("strategy", "seeds", "budget", "rounds", "warm_epochs"))


if __name__ == "__main__":
    sys.exit(main())
