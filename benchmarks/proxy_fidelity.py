"""Proxy fidelity on BCCD: does the proxy's ΔmAP rank candidate batches as really labeling them does?

    OMP_NUM_THREADS=1 python -m benchmarks.proxy_fidelity [--quick] [--batches 8] [--seeds 0,1]
                                                          [--proxy-seeds 0,1,2] [--json PATH]

Round setup as in `benchmarks.lookup_table` (pool = BCCD `train`, seeded labeled set L, task detector trained
on L with the configured schedule). Candidate batches S of `--budget` pool images: `--batches` uniformly
random ones plus one chosen by each of `--strategies` (so the batches differ in kind, not only by chance).

- proxy ΔmAP(S) = proxy(S) − proxy(∅), `proxy.make_proxy` as production computes it (validation part carved
  from L), mean over `--proxy-seeds`;
- real ΔmAP(S) = mAP(detector trained on L ∪ S with labels) − mAP(detector trained on L), both trained from
  scratch with the task detector's schedule, mean over training `--seeds`, measured on BCCD's `val` split
  (never `test`).

Prints per batch both values, the batch's object count and the share of its proposals that the consistency
loss counts (L_U active), then Spearman ρ(proxy Δ, real Δ), ρ(object
count, real Δ) as a naive yardstick, and the noise of each side: the spread over seeds within a batch against
the spread between batches. If the proxy's within-batch noise is as large as its between-batch spread, or ρ
is near 0, the look-up table's reward carries no signal and MAGRAL cannot beat random selection.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lookup_table import DEFAULT_DATA, bench_setup


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def noise(values: np.ndarray) -> dict[str, float]:
    """`values` (batches, seeds): mean over batches of the std over seeds ("within") and std over batches of
    the per-batch means ("between")."""
    return {"within": float(values.std(axis=1).mean()), "between": float(values.mean(axis=1).std())}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from scipy.stats import spearmanr

    from magral_core.method.proxy import consistency_mask, make_proxy
    from magral_core.method.strategies import make_strategy
    from magral_core.simulation import DetectorLearner
    from magral_core.vision.detectors import build_detector
    from magral_core.vision.engine import DecodedImageCache, predict, train_detector
    from magral_core.vision.evaluation import evaluate_coco

    setup = bench_setup(args)
    config, timer, budget, settings, r = setup.config, setup.timer, setup.budget, setup.settings, setup.round
    n_random = args.batches if args.batches is not None else (2 if args.quick else 8)
    strategies = [s for s in (args.strategies or ("entropy_max" if args.quick else "entropy_max,coreset"))
                  .split(",") if s]
    seeds = _ints(args.seeds) if args.seeds else (args.seed,)
    proxy_seeds = _ints(args.proxy_seeds) if args.proxy_seeds else ((0,) if args.quick else (0, 1, 2))
    val = r.dataset.split("val")
    val_limit = args.val_limit or (30 if args.quick else None)
    if val_limit is not None:
        val = val.subset(range(min(val_limit, len(val))))
    val_cache = DecodedImageCache(val, config.image_size)
    print(f"pool={len(r.pool)} labeled={len(r.labeled)} val={len(val)} image_size={config.image_size} "
          f"epochs={config.epochs} budget={budget} seeds={seeds} proxy_seeds={proxy_seeds} "
          f"threads={torch.get_num_threads()}", flush=True)

    rng = np.random.default_rng(args.seed + 2)
    batches: list[tuple[str, np.ndarray]] = [
        ("random", np.sort(rng.choice(len(r.unlabeled), budget, replace=False))) for _ in range(n_random)
    ]
    if strategies:
        learner = DetectorLearner(r.pool, val, config)
        with timer("features"):
            pool = learner.pool(r.model, r.unlabeled, r.labeled)
        for name in strategies:
            picks = make_strategy(name).rank(pool, budget, np.random.default_rng(args.seed))
            batches.append((name, np.sort([p.index for p in picks[:budget]])))

    proxy = make_proxy(r.model, r.pool, r.labeled, r.unlabeled, settings, seed=config.seed)

    @torch.no_grad()
    def active(batch: np.ndarray) -> float:
        # share of the batch's proposals the consistency loss counts under the task detector's head: near 0,
        # L_U vanishes and the proxy cannot tell batches apart
        predictor = r.model.roi_heads.box_predictor
        shares = []
        for i in batch:
            f = proxy.pool[int(i)]
            rois = settings.unlabeled_rois
            a, b = predictor(f.reps[:rois]), predictor(f.reps_flip[:rois])
            shares.append(float(consistency_mask(a[0], b[0]).float().mean()))
        return float(np.mean(shares))

    with timer("proxy"):
        reference = np.array([proxy(np.zeros(0, np.int64), s) for s in proxy_seeds])
        proxy_map = np.array([[proxy(b, s) for s in proxy_seeds] for _, b in batches])  # (K, P)
    proxy_delta = proxy_map - reference[None, :]

    def val_map(model: Any) -> float:
        value = evaluate_coco(val, predict(model, val, score_threshold=config.score_threshold,
                                           cache=val_cache)).map
        return 0.0 if np.isnan(value) else float(value)

    def trained(positions: np.ndarray, seed: int) -> Any:
        model = build_detector(config.detector, num_classes=r.pool.num_classes, image_size=config.image_size,
                               weights_dir=config.weights_dir, seed=seed)
        train_detector(model, r.pool.subset(positions.tolist()), epochs=config.epochs,
                       batch_size=config.batch_size, learning_rate=config.learning_rate, seed=seed,
                       device=config.device)
        return model

    real_map = np.zeros((len(batches), len(seeds)))
    base = np.zeros(len(seeds))
    with timer("retrain"):
        for j, seed in enumerate(seeds):
            base[j] = val_map(r.model if seed == args.seed else trained(r.labeled, seed))
            for k, (kind, batch) in enumerate(batches):
                real_map[k, j] = val_map(trained(np.union1d(r.labeled, r.unlabeled[batch]), seed))
                print(f"  seed {seed} batch {k} ({kind}): val mAP {real_map[k, j]:.4f} "
                      f"(L alone {base[j]:.4f})", flush=True)
    real_delta = real_map - base[None, :]
    objects = np.array([sum(len(r.pool.images[int(i)].labels) for i in r.unlabeled[b]) for _, b in batches])

    def rho(a: np.ndarray, b: np.ndarray) -> float:
        if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
            return float("nan")
        return float(spearmanr(a, b).statistic)

    return {
        "quick": args.quick, "pool": len(r.pool), "labeled": len(r.labeled), "val": len(val),
        "image_size": config.image_size, "epochs": config.epochs, "budget": budget, "seeds": list(seeds),
        "proxy_seeds": list(proxy_seeds), "proxy_epochs": settings.epochs,
        "batches": [{"kind": kind, "indices": r.unlabeled[b].tolist(), "objects": int(n),
                     "consistency_active": active(b), "proxy_delta": pd.tolist(), "real_delta": rd.tolist()}
                    for (kind, b), n, pd, rd in zip(batches, objects, proxy_delta, real_delta, strict=True)],
        "proxy_reference": reference.tolist(), "real_base": base.tolist(),
        "spearman_proxy_real": rho(proxy_delta.mean(1), real_delta.mean(1)),
        "spearman_objects_real": rho(objects.astype(float), real_delta.mean(1)),
        "proxy_noise": noise(proxy_delta), "real_noise": noise(real_delta),
        "seconds": dict(timer.wall),
    }


def print_result(result: dict[str, Any]) -> None:
    print("batch kind          objects  L_U active  proxy ΔmAP  real ΔmAP")
    for k, b in enumerate(result["batches"]):
        print(f"{k:5d} {b['kind']:13s} {b['objects']:7d} {b['consistency_active']:10.3f} "
              f"{np.mean(b['proxy_delta']):+11.5f} {np.mean(b['real_delta']):+10.5f}")
    print(f"Spearman rho(proxy, real) = {result['spearman_proxy_real']:.3f}; "
          f"rho(objects, real) = {result['spearman_objects_real']:.3f} over {len(result['batches'])} batches")
    for side in ("proxy", "real"):
        n = result[f"{side}_noise"]
        print(f"{side} ΔmAP: within-batch (seed) std {n['within']:.4f}, between-batch std {n['between']:.4f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="small images, short schedules, 60-image pool, 3 batches: checks that it runs")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BCCD root (COCO JSON with splits)")
    parser.add_argument("--labeled", type=int, default=None, help="labeled images (default 30, quick 20)")
    parser.add_argument("--budget", type=int, default=None, help="batch size (default: config, quick 5)")
    parser.add_argument("--batches", type=int, default=None, help="random batches (default 8, quick 2)")
    parser.add_argument("--strategies", default=None,
                        help="one more batch per strategy (default entropy_max,coreset; quick entropy_max)")
    parser.add_argument("--seeds", default=None,
                        help="detector training seeds, comma-separated (default: --seed)")
    parser.add_argument("--proxy-seeds", default=None, help="proxy seeds (default 0,1,2; quick 0)")
    parser.add_argument("--pool-limit", type=int, default=None,
                        help="random subset of the pool (default: all of train, quick 60)")
    parser.add_argument("--val-limit", type=int, default=None,
                        help="first images of the val split (default: all, quick 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    result = measure(args)
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
