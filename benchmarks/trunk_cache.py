"""What reusing frozen trunk maps saves on a BCCD curve, and whether the curve stays where it was: paired
curves of one strategy (the same seeds, so the same initial sets) with the trunk cache off and on.

    python -m benchmarks.trunk_cache run [--data DIR] [--strategy random] [--seeds 0] [--budget 20]
        [--rounds 5] [--store DIR] [--out DIR]
    python -m benchmarks.trunk_cache report [--out DIR] [--markdown]

`run` starts two `magral simulate` processes side by side, one torch thread each: `computed` with
`MAGRAL_TRUNK_CACHE_MIB=0` (every pass computes the trunk), `cached` with the configured cache (trunk maps
computed once per image and flip, reused across epochs, rounds and passes: `vision.trunk_cache`). Rounds are
stored under `--store` (resumed), reports written to `<out>/computed` and `<out>/cached`. `report` writes
`<out>/trunk_cache.json`: per round cached − computed test mAP (mean and 95% interval over the seeds; the
cached maps equal the computed ones up to float rounding, which a training amplifies like a change of
machine), and per variant and seed the curve's seconds in training, evaluation and pool features, and the
ratios cached / computed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks.paired_runs import REPO, dispatch, paired, paired_markdown, simulate_command, variant_parser

DEFAULT_OUT = REPO / "docs" / "results" / "trunk_cache_bccd"
VARIANTS = ("computed", "cached")
COMPONENTS = ("train", "evaluate", "features")


def variant_command(args: argparse.Namespace, variant: str) -> tuple[list[str], dict[str, str]]:
    """The `magral simulate` command line and environment of one variant."""
    env = {"MAGRAL_TRUNK_CACHE_MIB": "0"} if variant == "computed" else {}
    return simulate_command(data=args.data, strategy=args.strategy, seeds=args.seeds, budget=args.budget,
                            rounds=args.rounds, store=args.store / variant, out=args.out / variant, env=env)


def analyse(computed: list[Any], cached: list[Any], strategy: str) -> dict[str, Any]:
    """`paired` figures plus, per variant and seed, the curve's seconds per component, and the ratios."""
    result = paired(computed, cached, strategy, VARIANTS)
    for variant, records in zip(VARIANTS, (computed, cached), strict=True):
        result[variant]["component_seconds"] = {
            str(seed): {k: float(sum(r.times.get(k, 0.0) for r in records if r.seed == seed))
                        for k in COMPONENTS}
            for seed in sorted({r.seed for r in records})}
    result["ratio"] = {
        seed: {k: result["cached"]["component_seconds"][seed][k] / seconds[k] for k in COMPONENTS}
        | {"curve": result["cached"]["curve_seconds"][seed] / result["computed"]["curve_seconds"][seed]}
        for seed, seconds in result["computed"]["component_seconds"].items()}
    return result


def markdown(result: dict[str, Any]) -> str:
    """The paired differences per round and the curve's seconds per component as Markdown."""
    lines = paired_markdown(result, VARIANTS)
    lines += ["| seed | part | computed s | cached s | cached / computed |", "|---|---|---|---|---|"]
    for seed, ratios in result["ratio"].items():
        seconds = {v: {**result[v]["component_seconds"][seed], "curve": result[v]["curve_seconds"][seed]}
                   for v in VARIANTS}
        for part in (*COMPONENTS, "curve"):
            lines.append(f"| {seed} | {part} | {seconds['computed'][part]:.0f} | "
                         f"{seconds['cached'][part]:.0f} | {ratios[part]:.2f} |")
    for variant in VARIANTS:
        maps = ", ".join(f"{100 * m:.1f}" for m in result[variant]["map_per_round"].values())
        lines.append(f"\n- {variant}: mean test mAP ×100 per round: {maps}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser, _ = variant_parser(__doc__, out=DEFAULT_OUT, store=REPO / "runs" / "trunk_cache",
                               strategy="random", seeds="0", table="trunk_cache.json")
    return dispatch(parser.parse_args(argv), variants=VARIANTS, command=variant_command, analyse=analyse,
                    markdown=markdown, table="trunk_cache.json",
                    settings=("strategy", "seeds", "budget", "rounds"))


if __name__ == "__main__":
    sys.exit(main())
