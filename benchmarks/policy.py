"""Policy-training throughput: episodes (sampled batches, each scored by the look-up table) per second.

Synthetic pool features (N, F) and a look-up table of random records stand in for a round; both controller
variants are timed over whole REINFORCE updates (sampling, reward, backward, Adam step) after a warm-up.

    OMP_NUM_THREADS=1 python benchmarks/policy.py --sizes 1000 10000 --threads 1

Prints one line per (variant, pool size) and, with --json, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from magral_core.method.lookup_table import LookupTable, Record, random_batches
from magral_core.method.policy import ControllerConfig, build_controller
from magral_core.method.policy_training import TrainingSettings, train_policy
from magral_core.vision.engine import setup_torch


def measure(variant: str, n: int, *, features: int, budget: int, records: int, updates: int,
            rollouts: int, seed: int = 0) -> dict[str, object]:
    """Episodes per second of `updates` timed REINFORCE updates (after one warm-up update)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    weights = rng.normal(size=n)
    batches = random_batches(n, budget, records, rng)
    table = LookupTable(n, [Record(b, float(weights[b].sum())) for b in batches])
    controller = build_controller(ControllerConfig(features, variant=variant), seed=seed)

    def reward(indices: np.ndarray) -> float:
        return float(table.estimate_many([indices])[0])

    train_policy(controller, x, budget, reward, TrainingSettings(updates=1, rollouts=rollouts))  # warm-up
    start = time.perf_counter()
    settings = TrainingSettings(updates=updates, rollouts=rollouts)
    history = train_policy(controller, x, budget, reward, settings)
    seconds = time.perf_counter() - start
    return {
        "variant": variant, "pool": n, "budget": budget, "features": features, "rollouts": rollouts,
        "updates": updates, "seconds": seconds, "episodes_per_s": updates * rollouts / seconds,
        "median_update_s": float(np.median(history.seconds)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--variants", nargs="+", default=["gumbel", "sequential"])
    parser.add_argument("--features", type=int, default=256, help="features per image (default 256)")
    parser.add_argument("--budget-fraction", type=float, default=0.1, help="budget / pool (default 0.1)")
    parser.add_argument("--records", type=int, default=24, help="look-up-table records (default 24)")
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per update (default 8)")
    parser.add_argument("--updates", type=int, default=5, help="timed updates (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    setup_torch(args.threads)
    results = []
    for variant in args.variants:
        for n in args.sizes:
            budget = max(1, round(args.budget_fraction * n))
            r = measure(variant, n, features=args.features, budget=budget, records=args.records,
                        updates=args.updates, rollouts=args.rollouts)
            results.append(r)
            print(f"{variant:10s} N={n:6d} B={budget:5d} threads={args.threads}: "
                  f"{r['episodes_per_s']:8.1f} episodes/s ({r['median_update_s']:.3f} s per update of "
                  f"{args.rollouts})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
