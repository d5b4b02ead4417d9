"""Forecast benchmark on simulated active-learning curves: how well the rounds so far predict the next one.

    python -m benchmarks.forecast RUNS [--flat-gain G] [--start 3] [--window W] [--json PATH]

RUNS is a `magral simulate` output directory (its `rounds/<strategy>/seed<s>/round<r>.json`) or the `--store`
directory it wrote them to. For every curve
(strategy, seed) and every k with at least 2 earlier rounds, the forecast (`magral_core.method.forecast`) is
fitted to rounds 0..k-1 and asked for the mAP at round k's label count; the error is against round k's
measured test mAP. Prints the mean absolute error per forecast method (power law with >= 3 rounds, straight
line with 2) next to the naive forecast "the last round's mAP carries on", and how often round k falls inside
the forecast's 68% band. The verdict check: the forecast from each curve's first `--start` rounds should say
"paying off" and the one from all its rounds "flattened" (on curves long enough to saturate). `--window W`
fits each forecast to the last W rounds only (default: all rounds, the service's setting).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from magral_core.atomic import atomic_open
from magral_core.config import Config
from magral_core.method.forecast import FLATTENED, PAYING_OFF, forecast


def load_curves(runs: Path) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """(strategy, seed) → [(n_labeled, mAP)] by round, from a simulate output directory (its `rounds/`) or
    from the `--store` directory it was given."""
    curves: dict[tuple[str, int], list[tuple[int, int, float]]] = defaultdict(list)
    store = runs / "rounds" if (runs / "rounds").is_dir() else runs
    for path in sorted(store.glob("*/seed*/round*.json")):
        record = json.loads(path.read_text())
        curves[(record["strategy"], int(record["seed"]))].append(
            (int(record["round"]), int(record["n_labeled"]), float(record["map"]))
        )
    if not curves:
        raise SystemExit(f"expected round files under {store}/<strategy>/seed<s>/, found none")
    return {key: [(n, m) for _, n, m in sorted(points)] for key, points in curves.items()}


def evaluate(curves: dict[tuple[str, int], list[tuple[int, float]]], *, flat_gain: float, start: int,
             window: int | None = None) -> dict[str, Any]:
    errors: dict[str, list[float]] = defaultdict(list)
    inside: list[bool] = []
    verdicts: dict[str, list[str | None]] = {"start": [], "end": []}
    for points in curves.values():
        for k in range(2, len(points)):
            seen = points[:k]
            n_next, actual = points[k]
            now = seen[-1][0]
            result = forecast([n for n, _ in seen], [m for _, m in seen], horizon=n_next - now,
                              flat_gain=flat_gain, window=window)
            if result.expected_map is None:
                continue
            errors[result.method].append(abs(result.expected_map - actual))
            errors["all"].append(abs(result.expected_map - actual))
            errors["last value"].append(abs(seen[-1][1] - actual))
            if result.band is not None:
                inside.append(result.band[0] <= actual <= result.band[1])
        for name, part in (("start", points[:start]), ("end", points)):
            result = forecast([n for n, _ in part], [m for _, m in part], horizon=1, flat_gain=flat_gain,
                              window=window)
            verdicts[name].append(result.verdict)
    return {
        "curves": len(curves),
        "mae": {k: statistics.fmean(v) for k, v in errors.items()},
        "forecasts": {k: len(v) for k, v in errors.items()},
        "band_coverage": statistics.fmean(inside) if inside else None,
        "band_forecasts": len(inside),
        "flattened_at_start": sum(v == FLATTENED for v in verdicts["start"]),
        "paying_off_at_start": sum(v == PAYING_OFF for v in verdicts["start"]),
        "flattened_at_end": sum(v == FLATTENED for v in verdicts["end"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="a `magral simulate` output directory")
    parser.add_argument("--flat-gain", type=float, default=Config.forecast_flat_gain,
                        help="mAP per 100 labels below which the curve has flattened (default: config's)")
    parser.add_argument("--start", type=int, default=3, help="rounds that make a curve's start (default 3)")
    parser.add_argument("--window", type=int, help="fit the last W rounds only (default: all)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    curves = load_curves(args.runs)
    result = evaluate(curves, flat_gain=args.flat_gain, start=args.start, window=args.window)
    lengths = sorted({len(p) for p in curves.values()})
    names = ", ".join(sorted({s for s, _ in curves}))
    fitted = f"last {args.window} rounds" if args.window else "all rounds"
    print(f"{result['curves']} curves ({names}; rounds per curve {lengths}) from {args.runs}; "
          f"fit on {fitted}")
    for method in ("power_law", "linear", "all", "last value"):
        if method in result["mae"]:
            print(f"  next-round mAP, mean absolute error, {method:>10}: {result['mae'][method]:.4f} "
                  f"({result['forecasts'][method]} forecasts)")
    if result["band_coverage"] is not None:
        print(f"  next round inside the 68% band: {100 * result['band_coverage']:.0f}% "
              f"of {result['band_forecasts']}")
    n = result["curves"]
    print(f"  verdict (flat gain {args.flat_gain} mAP per 100 labels): first {args.start} rounds "
          f"'paying off' on {result['paying_off_at_start']}/{n}, "
          f"'flattened' on {result['flattened_at_start']}/{n}; all rounds 'flattened' on "
          f"{result['flattened_at_end']}/{n}")
    if args.json:
        result["flat_gain"], result["start"], result["window"] = args.flat_gain, args.start, args.window
        result["points"] = {f"{s}/seed{seed}": points for (s, seed), points in sorted(curves.items())}
        with atomic_open(args.json, "w") as handle:
            handle.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
