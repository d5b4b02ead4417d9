"""MAGRAL's ranking and policy training, and the fallback strategies' ranking, on synthetic pools of growing
size, at the feature level (no detector runs).

    MAGRAL_THREADS=1 OMP_NUM_THREADS=1 python -m benchmarks.scale_features --sizes 1000 10000 100000 \
        --json docs/results/scale_features.json

Pool (seeded by `--seed`): N images with D-dim embeddings (`--dim`, default 256: the default detector's two
128-channel FPN levels, pooled) drawn around 32 cluster centres, and per image Poisson(`--detections`)
detections of 3 classes with a softmax over background + classes, as `vision.engine.extract` gives them;
`--labeled` labeled embeddings. `Pool` builds the per-image features (`method.features.pool_features`)
as a round's ranking stage does (`pool_s`).

Reward: a known function of the batch's features, standing in for the proxy. Each image has a hidden utility
u_i = entropy_mean_i + 0.5 · confident_i + 0.2 · (a fixed random direction · embedding_i), all z-scored
over the pool; a batch is worth 0.3 + 0.01 · mean u over the batch + noise of std 0.001 drawn from
(indices, seed). MAGRAL runs as a round runs it: `service.magral_round.magral_settings` of the environment's
config (MAGRAL_LUT_RECORDS, MAGRAL_LUT_NEIGHBOURS, MAGRAL_POLICY_EPISODES, MAGRAL_BUDGET, MAGRAL_SEED),
`strategies.fit_magral` (records through `lookup_table.compute_record`, the best estimator, REINFORCE in
two stages) and `MagralStrategy.rank`. Its batch's true value is printed against the mean of random
batches and against the best batch the utility allows (the top-B utilities), so a fit that learned nothing
shows.

Heuristics: `make_strategy(name).rank` for each of `--heuristics` (default entropy_max, coreset, ppal, the
fallback strategies) on the same pool.

`--candidates`: where the config's candidate rule applies (`method.candidates`; MAGRAL_CANDIDATES_ABOVE,
default 2,000), the pool is first cut to a round's candidates (a first round: nothing carried) and every
phase after it, MAGRAL and the heuristics, works on them, as a round does; batch values stay on the whole
pool's utility, so `value_best` (the pool's top-B utilities) shows what the subset gives up.

Each size runs in a child process of its own, so its memory is that size's alone: per phase the wall
seconds, the process's CPU seconds (on a shared machine wall time stretches with the load, CPU time much
less) and the peak RSS (VmHWM, reset before the phase); `rss_peak_mib` is the child's highest, `rss_base_mib`
its RSS after imports (torch included). Sizes run one after another; the 1-minute load average is recorded
before and after each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from magral_core.structures import Detections

T = TypeVar("T")

N_CLASSES = 3
CLUSTERS = 32


def rss_mib() -> dict[str, float]:
    """{"rss": VmRSS, "hwm": VmHWM} of this process in MiB (from /proc/self/status)."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "hwm"] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` 5); False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def synthetic_pool(
    n: int, dim: int, detections: float, labeled: int, seed: int
) -> tuple[np.ndarray, tuple[Detections, ...], np.ndarray]:
    """(embeddings (N, D) float32, a tuple of N Detections, labeled embeddings (L, D)) of a seeded pool."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, dim)).astype(np.float32)
    which = rng.integers(0, CLUSTERS, size=n + labeled)
    emb = centres[which] + 0.5 * rng.normal(size=(n + labeled, dim)).astype(np.float32)
    emb = np.abs(emb)  # pooled ReLU maps are non-negative
    counts = np.minimum(rng.poisson(detections, size=n), 100)
    total = int(counts.sum())
    sharpness = rng.uniform(0.3, 3.0, size=total)[:, None]  # some confident, some ambiguous detections
    logits = rng.normal(size=(total, N_CLASSES + 1)) * sharpness * 2.0
    logits[:, 0] -= 1.0  # a kept detection is seldom mostly background
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)  # (K, C + 1), background first
    labels = probs[:, 1:].argmax(1).astype(np.int64)
    scores = probs[np.arange(total), labels + 1]
    xy = rng.uniform(0, 400, size=(total, 2)).astype(np.float32)
    wh = rng.uniform(8, 80, size=(total, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], axis=1)
    ends = np.cumsum(counts)
    starts = ends - counts
    dets = tuple(Detections(boxes[s:e], scores[s:e], labels[s:e], probs[s:e])
                 for s, e in zip(starts, ends, strict=True))
    return emb[:n], dets, emb[n:]


def utilities(features: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """The hidden per-image utility u (N,) of the module docstring, from the pool's normalised features."""
    from magral_core.method.features import STAT_NAMES

    direction = np.random.default_rng(seed + 7).normal(size=dim)
    direction /= np.linalg.norm(direction)
    entropy_mean = features[:, dim + STAT_NAMES.index("entropy_mean")]
    confident = features[:, dim + STAT_NAMES.index("confident")]
    spread = features[:, :dim] @ direction
    spread = (spread - spread.mean()) / max(float(spread.std()), 1e-12)
    return (entropy_mean + 0.5 * confident + 0.2 * spread).astype(np.float64)


class Phases:
    """Wall seconds, process CPU seconds and peak RSS (MiB; NaN when the peak cannot be reset) of named
    phases, into `out` as `<name>_s`, `<name>_cpu_s`, `<name>_rss_mib`; `peak` is the highest RSS seen."""

    def __init__(self, out: dict[str, Any]) -> None:
        self.out = out
        self.peak = rss_mib()["hwm"]

    def run(self, name: str, fn: Callable[[], T]) -> T:
        self.peak = max(self.peak, rss_mib()["hwm"])  # resetting forgets the peak so far
        can_reset = reset_peak()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.out[f"{name}_s"] = time.perf_counter() - wall
        self.out[f"{name}_cpu_s"] = time.process_time() - cpu
        hwm = rss_mib()["hwm"]
        self.out[f"{name}_rss_mib"] = hwm if can_reset else float("nan")
        self.peak = max(self.peak, hwm)
        return result


def child(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement at pool size `n`, in this process."""
    from magral_core.config import Config
    from magral_core.method.candidates import CandidateRule, candidate_positions
    from magral_core.method.strategies import Pool, fit_magral, make_strategy
    from magral_core.service.magral_round import magral_settings
    from magral_core.vision.engine import setup_torch

    config = Config.from_env()
    setup_torch(config.torch_threads)
    settings = magral_settings(config)
    budget = min(config.budget, n)
    base = rss_mib()["rss"]
    out: dict[str, Any] = {"pool": n, "budget": budget, "dim": args.dim, "records": settings.records,
                           "episodes": settings.training.updates, "rollouts": settings.training.rollouts,
                           "threads": config.torch_threads, "rss_base_mib": base}
    phases = Phases(out)
    emb, dets, lab = phases.run(
        "synthesis", lambda: synthetic_pool(n, args.dim, args.detections, args.labeled, args.seed))
    out["detections"] = int(sum(len(d) for d in dets))
    chosen = np.arange(n)
    rule = CandidateRule(config.candidates_above, config.candidate_factor, config.candidate_carry)
    if args.candidates and rule.applies(n):
        # the utility is the whole pool's (untimed: a round with candidates never builds these features)
        utility = utilities(np.asarray(Pool(emb, dets, lab).features), args.dim, args.seed)
        chosen = phases.run("candidates", lambda: candidate_positions(n, budget, rule, (), config.seed))
        emb, dets = emb[chosen], tuple(dets[i] for i in chosen)
    out["ranked"] = len(chosen)
    pool = phases.run("pool", lambda: Pool(emb, dets, lab))
    features = pool.features
    assert features is not None  # filled by Pool
    if len(chosen) == n:
        utility = utilities(features, args.dim, args.seed)

    def value(indices: np.ndarray) -> float:  # indices: positions in the ranked pool
        return 0.3 + 0.01 * float(utility[chosen[np.asarray(indices, dtype=np.int64)]].mean())

    calls = [0]

    def evaluate(indices: np.ndarray, seed: int) -> float:
        calls[0] += 1
        noise = np.random.default_rng([seed, *np.sort(np.asarray(indices, dtype=np.int64))[:8]]).normal()
        return value(indices) + 0.001 * float(noise)

    strategy, report = phases.run("fit", lambda: fit_magral(features, budget, evaluate, settings,
                                                             seed=config.seed))
    out["policy_training_s"] = float(sum(sum(h.seconds) for h in report.history))
    picks = phases.run("rank", lambda: strategy.rank(pool, budget, np.random.default_rng(config.seed)))
    out["magral_s"] = out["fit_s"] + out["rank_s"]
    out["magral_cpu_s"] = out["fit_cpu_s"] + out["rank_cpu_s"]
    out["evaluations"] = calls[0]
    out["estimators"] = report.estimator
    rng = np.random.default_rng(args.seed + 3)
    out["value_magral"] = value(np.array([p.index for p in picks[:budget]]))
    randoms = [0.3 + 0.01 * float(utility[rng.choice(n, budget, replace=False)].mean()) for _ in range(200)]
    out["value_random_mean"] = float(np.mean(randoms))
    out["value_best"] = 0.3 + 0.01 * float(np.sort(utility)[-budget:].mean())  # over the whole pool
    out["heuristics"] = {}
    for name in args.heuristics:
        figures: dict[str, Any] = {}
        heuristic = make_strategy(name)
        ranked = Phases(figures).run(
            "rank", partial(heuristic.rank, pool, budget, np.random.default_rng(config.seed)))
        figures["value"] = value(np.array([p.index for p in ranked[:budget]]))
        phases.peak = max(phases.peak, figures["rank_rss_mib"])
        out["heuristics"][name] = figures
    out["rss_peak_mib"] = max(phases.peak, rss_mib()["hwm"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--dim", type=int, default=256, help="embedding width D (default 256)")
    parser.add_argument("--detections", type=float, default=12.0, help="mean detections per image")
    parser.add_argument("--labeled", type=int, default=100, help="labeled embeddings (default 100)")
    parser.add_argument("--heuristics", nargs="+", default=["entropy_max", "coreset", "ppal"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--candidates", action="store_true",
                        help="rank a candidate subset where the config's rule applies "
                             "(MAGRAL_CANDIDATES_ABOVE, MAGRAL_CANDIDATE_FACTOR; a first round, "
                             "nothing carried)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args)))
        return
    results = []
    passed = ["--dim", str(args.dim), "--detections", str(args.detections), "--labeled", str(args.labeled),
              "--seed", str(args.seed), "--heuristics", *args.heuristics,
              *(["--candidates"] if args.candidates else [])]
    for n in args.sizes:
        load_before = os.getloadavg()[0]
        done = subprocess.run([sys.executable, "-m", "benchmarks.scale_features", *passed, "--child", str(n)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"pool {n}: child failed ({done.returncode}):\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        r["load_before"], r["load_after"] = load_before, os.getloadavg()[0]
        results.append(r)
        print(f"N={n:6d} ranked {r['ranked']} B={r['budget']} D={r['dim']} records={r['records']} "
              f"episodes={r['episodes']} "
              f"threads={r['threads']} load {r['load_before']:.2f}->{r['load_after']:.2f}\n"
              f"  pool features {r['pool_s']:.1f} s; magral fit {r['fit_s']:.1f} s (policy training "
              f"{r['policy_training_s']:.1f} s, estimators {'/'.join(r['estimators'])}) + rank "
              f"{r['rank_s']:.1f} s = {r['magral_s']:.1f} s wall, {r['magral_cpu_s']:.1f} s CPU; "
              f"peak RSS {r['rss_peak_mib']:.0f} MiB "
              f"(after imports {r['rss_base_mib']:.0f}, during fit {r['fit_rss_mib']:.0f})\n"
              f"  batch value magral {r['value_magral']:.5f}, random {r['value_random_mean']:.5f}, "
              f"best {r['value_best']:.5f}", flush=True)
        for name, h in r["heuristics"].items():
            print(f"  {name:12s} rank {h['rank_s']:7.2f} s wall, {h['rank_cpu_s']:7.2f} s CPU, peak RSS "
                  f"{h['rank_rss_mib']:.0f} MiB, "
                  f"batch value {h['value']:.5f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python -m benchmarks.scale_features",
                                                              *sys.argv[1:]]),
                                         "cpus": os.cpu_count(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
