"""Reward fidelity on BCCD: does a reward estimator rank candidate batches as really labeling them does?

    OMP_NUM_THREADS=1 MAGRAL_IMAGE_SIZE=320 python -m benchmarks.proxy_fidelity [--quick] [--labeled 40]
        [--seeds 0,1] [--estimators proxy,pseudo_label,retrospective] [--results DIR] [--json PATH]

Round setup as in `benchmarks.lookup_table` (pool = BCCD `train`, seeded labeled set L, task detector trained
with the configured schedule on L less the proxy's validation part, `proxy.split_validation`). Candidate
batches S of `--budget` pool images from mixed sources: `--batches` uniformly random ones, the top and the
next-ranked by uncertainty (`entropy_max`), a core-set one (a fresh greedy start per batch), and the highest
and lowest predicted object counts (top and next ranks), so the batches differ in kind, not only by chance.

- estimator value(S): every estimator of `magral_core.method.rewards` (`--estimators`) on the same round,
  paired (value(S) − value(∅) under the same seed, common random numbers), mean over `--proxy-seeds` seeds
  (the retrospective surrogate is deterministic once its records are); seconds per record are timed apart
  from the round's one-off caching;
- label-free references: the batch's predicted object count (detections scoring >= 0.5) and summed
  uncertainty (class entropy summed over its detections); the true object count is printed as an oracle;
- real ΔmAP(S) = mAP(detector trained on L_train ∪ S with labels) − mAP(detector trained on L_train), both
  trained from scratch with the round's schedule, per training seed (`--seeds`), on BCCD's `val` split
  (never `test`). With `--warm-epochs K` both trainings instead start from the round's detector
  (`vision.warm_start`, as the next service round would) and run K epochs under the same seed, so the
  difference is what labeling S adds to the round's own model (cached apart, under `warm<K>/`).

Prints Spearman ρ(value, real Δ) with a bootstrap 95% interval (batches resampled) per estimator and
reference. Resumable: the estimator values and every real training (L size, batch, seed) are cached as
atomic JSON under `--results`, and the table is rewritten (`--json`, with `complete: false` until every
training is done) after each training, so a killed run continues where it stopped.

Kept as one module because it is one benchmark command whose measurements share one round and one set of
candidate batches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lookup_table import DEFAULT_DATA, REPO, bench_setup
from magral_core.cli.progress import track
from magral_core.simulation.statistics import gain_reliability


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def noise(values: np.ndarray) -> dict[str, float]:
    """`values` (batches, seeds): mean over batches of the std over seeds ("within") and std over batches of
    the per-batch means ("between")."""
    return {"within": float(values.std(axis=1).mean()), "between": float(values.mean(axis=1).std())}


def rho(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman ρ; NaN for fewer than 3 values or a constant side."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def bootstrap_rho(a: np.ndarray, b: np.ndarray, *, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of Spearman ρ over `draws` resamplings of the pairs (NaN draws dropped)."""
    rng = np.random.default_rng(seed)
    values = [rho(a[i], b[i]) for i in (rng.integers(len(a), size=len(a)) for _ in range(draws))]
    finite = np.array([v for v in values if np.isfinite(v)])
    if len(finite) == 0:
        return float("nan"), float("nan")
    return float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write(path: Path, data: Any) -> None:
    from magral_core.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1))


def candidate_batches(pool: Any, budget: int, n_random: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(source, sorted Pool positions) of the mixed candidate batches (see module doc)."""
    from magral_core.method.features import class_distributions, entropy
    from magral_core.method.strategies import make_strategy

    n = len(pool)
    rng = np.random.default_rng(seed + 2)
    out = [("random", np.sort(rng.choice(n, budget, replace=False))) for _ in range(n_random)]
    unc = np.array([entropy(class_distributions(d)).max() if len(d) else 0.0 for d in pool.detections])
    count = np.array([float((np.asarray(d.scores) >= 0.5).sum()) for d in pool.detections])
    shuffle = rng.permutation(n)  # ties broken at random, not by pool position
    for name, key in (("uncertainty", -unc), ("count_high", -count), ("count_low", count)):
        order = shuffle[np.argsort(key[shuffle], kind="stable")]
        out += [(name, np.sort(order[:budget])), (f"{name}_next", np.sort(order[budget:2 * budget]))]
    picks = make_strategy("coreset").rank(pool, 2 * budget, np.random.default_rng(seed))
    out += [("coreset", np.sort([p.index for p in picks[:budget]])),
            ("coreset_next", np.sort([p.index for p in picks[budget:2 * budget]]))]
    seen: set[tuple[int, ...]] = set()
    unique = []
    for kind, batch in out:  # a source that repeats another's batch gives way to a random one
        while tuple(batch) in seen:
            kind, batch = "random", np.sort(rng.choice(n, budget, replace=False))
        seen.add(tuple(batch))
        unique.append((kind, batch))
    return unique


def batch_key(positions: np.ndarray) -> str:
    return hashlib.sha1(",".join(str(int(i)) for i in np.sort(positions)).encode()).hexdigest()[:12]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from magral_core.method.features import class_distributions, entropy
    from magral_core.method.rewards import RewardRound, make_reward
    from magral_core.method.strategies import Pool
    from magral_core.vision.detectors import build_detector
    from magral_core.vision.engine import DecodedImageCache, extract, predict, train_detector
    from magral_core.vision.evaluation import evaluate_coco
    from magral_core.vision.warm_start import warm_start

    setup = bench_setup(args)
    config, timer, budget, r = setup.config, setup.timer, setup.budget, setup.round
    n_random = args.batches if args.batches is not None else (2 if args.quick else 8)
    seeds = _ints(args.seeds) if args.seeds else ((args.seed,) if args.quick else (0, 1))
    proxy_seeds = _ints(args.proxy_seeds) if args.proxy_seeds else ((0,) if args.quick else (0, 1))
    estimators = [e for e in args.estimators.split(",") if e]
    val = r.dataset.split("val")
    val_limit = args.val_limit or (30 if args.quick else None)
    if val_limit is not None:
        val = val.subset(range(min(val_limit, len(val))))
    val_cache = DecodedImageCache(val, config.image_size)
    tag = f"L{len(r.labeled)}{'_quick' if args.quick else ''}"
    results = args.results / tag
    real_results = results / f"warm{args.warm_epochs}" if args.warm_epochs else results
    real_kind = (f"warm-started from the round's detector, {args.warm_epochs} epochs" if args.warm_epochs
                 else f"from the ImageNet trunk, {config.epochs} epochs")
    print(f"pool={len(r.pool)} labeled={len(r.labeled)} (detector {len(r.train_part)}, proxy val "
          f"{len(r.val_part)}) val={len(val)} image_size={config.image_size} epochs={config.epochs} "
          f"budget={budget} seeds={seeds} estimator seeds={proxy_seeds} threads={torch.get_num_threads()} "
          f"real trainings {real_kind}", flush=True)

    train_set = r.pool.subset(r.train_part.tolist())
    with timer("features"):
        detections, embeddings = extract(r.model, r.pool.subset(r.unlabeled.tolist()),
                                         score_threshold=config.score_threshold)
        lab_det, lab_emb = extract(r.model, train_set, score_threshold=config.score_threshold)
    pool = Pool(embeddings, tuple(detections), lab_emb)
    batches = candidate_batches(pool, budget, n_random, args.seed)

    count = np.array([sum(float((np.asarray(pool.detections[int(i)].scores) >= 0.5).sum()) for i in b)
                      for _, b in batches])
    uncertainty = np.array([sum(float(entropy(class_distributions(pool.detections[int(i)])).sum())
                                for i in b) for _, b in batches])
    objects = np.array([sum(len(r.pool.images[int(i)].labels) for i in r.unlabeled[b]) for _, b in batches])

    # --- estimators (cheap; cached as one file per estimator) ---
    round_ = RewardRound(r.model, train_set, r.pool.subset(r.val_part.tolist()),
                         r.pool.subset(r.unlabeled.tolist()), tuple(detections), embeddings, tuple(lab_det),
                         lab_emb)
    keys = [batch_key(b) for _, b in batches]
    values: dict[str, dict[str, Any]] = {}
    for name in estimators:
        path = results / f"estimator_{name}.json"
        done = _read(path)
        if done is None or done["keys"] != keys:
            start = time.perf_counter()
            reward = make_reward(name, round_, budget=budget, score_threshold=config.score_threshold,
                                 seed=proxy_seeds[0], noise_seeds=len(proxy_seeds), paired=True)
            first = reward(batches[0][1], 0)  # the round's one-off work (caching, references, records)
            setup_s = time.perf_counter() - start
            per, vals = [], [first]
            for _, b in track(batches[1:], desc=f"{name} rewards", unit="batch"):
                t = time.perf_counter()
                vals.append(reward(b, 0))
                per.append(time.perf_counter() - t)
            record_s = float(np.median(per)) if per else float("nan")
            done = {"keys": keys, "values": vals, "setup_s": setup_s - record_s, "record_s": record_s}
            _write(path, done)
        values[name] = done
        print(f"  estimator {name}: {done['record_s']:.2f} s per record, one-off {done['setup_s']:.1f} s",
              flush=True)

    # --- real gains (expensive; one file per (L size, batch, seed)) ---
    def val_map(model: Any) -> float:
        value = evaluate_coco(val, predict(model, val, score_threshold=config.score_threshold,
                                           cache=val_cache)).map
        return 0.0 if np.isnan(value) else float(value)

    retrain_seconds: dict[str, float] = {}  # per cached training: what it took when it ran

    def real(positions: np.ndarray, key: str, seed: int) -> float | None:
        path = real_results / f"real_{key}_seed{seed}.json"
        cached = _read(path)
        if cached is not None:
            retrain_seconds[path.name] = float(cached.get("seconds", 0.0))
            return float(cached["map"])
        if args.estimators_only:
            return None
        start = time.perf_counter()
        if seed == args.seed and key == "base" and not args.warm_epochs:
            model = r.model  # the round's detector is exactly this training
        else:
            model = build_detector(config.detector, num_classes=r.pool.num_classes,
                                   image_size=config.image_size, weights_dir=config.weights_dir, seed=seed)
            if args.warm_epochs:
                warm_start(model, r.model)
            train_detector(model, r.pool.subset(positions.tolist()),
                           epochs=args.warm_epochs or config.epochs, batch_size=config.batch_size,
                           learning_rate=config.learning_rate, seed=seed, device=config.device)
        value = val_map(model)
        retrain_seconds[path.name] = time.perf_counter() - start
        _write(path, {"map": value, "seed": seed, "images": len(positions),
                      "seconds": retrain_seconds[path.name]})
        return value

    def table(base: dict[int, float], real_map: dict[tuple[int, int], float]) -> dict[str, Any]:
        done = [k for k in range(len(batches)) if any((k, s) in real_map for s in seeds)]
        delta = np.array([np.mean([real_map[(k, s)] - base[s] for s in seeds if (k, s) in real_map])
                          for k in done])
        rows = {}
        refs = {"predicted_count": count, "summed_uncertainty": uncertainty, "true_objects (oracle)": objects}
        for name, column in [*((n, np.array(v["values"])) for n, v in values.items()), *refs.items()]:
            a = np.asarray(column, float)[done]
            low, high = bootstrap_rho(a, delta) if len(done) >= 3 else (float("nan"), float("nan"))
            rows[name] = {"rho": rho(a, delta), "low": low, "high": high,
                          "record_s": values[name]["record_s"] if name in values else 0.0,
                          "setup_s": values[name]["setup_s"] if name in values else 0.0}
        pairs = {k: [real_map[(k, s)] - base[s] for s in seeds if (k, s) in real_map] for k in done}
        complete = len(real_map) == len(batches) * len(seeds)
        within = [float(np.std(v)) for v in pairs.values() if len(v) > 1]
        return {
            "complete": complete, "quick": args.quick, "pool": len(r.pool), "labeled": len(r.labeled),
            "detector_train": len(r.train_part), "proxy_val": len(r.val_part), "val": len(val),
            "image_size": config.image_size, "epochs": config.epochs, "budget": budget, "seeds": list(seeds),
            "real_trainings": real_kind,
            "estimator_seeds": list(proxy_seeds), "batches_done": len(done), "trainings_done": len(real_map),
            "rho": rows,
            "real_noise": {"within_seed_std": float(np.mean(within)) if within else float("nan"),
                           "between_batch_std": float(np.std(delta)) if len(delta) else float("nan"),
                           **{k: v if np.isfinite(v) else None  # JSON has no infinity
                              for k, v in gain_reliability(list(pairs.values())).items()}},
            "batches": [{"kind": batches[k][0], "indices": r.unlabeled[batches[k][1]].tolist(),
                         "true_objects": int(objects[k]), "predicted_count": float(count[k]),
                         "summed_uncertainty": float(uncertainty[k]),
                         "estimators": {n: v["values"][k] for n, v in values.items()},
                         "real_delta": pairs.get(k, [])} for k in range(len(batches))],
            "real_base": {str(s): v for s, v in base.items()},
            "seconds": {**timer.wall, "retrain": sum(retrain_seconds.values())},
        }

    base: dict[int, float] = {}
    real_map: dict[tuple[int, int], float] = {}
    result = table(base, real_map)
    for seed in seeds:
        value = real(r.train_part, "base", seed)
        if value is None:
            continue
        base[seed] = value
        for k, (kind, b) in track(list(enumerate(batches)), desc=f"seed {seed} retrains", unit="batch"):
            with timer("retrain"):
                value = real(np.union1d(r.train_part, r.unlabeled[b]), keys[k], seed)
            if value is None:
                continue
            real_map[(k, seed)] = value
            print(f"  seed {seed} batch {k} ({kind}): val mAP {value:.4f} (L alone {base[seed]:.4f})",
                  flush=True)
            result = table(base, real_map)
            if args.json:
                _write(args.json, result)
    return result


def print_result(result: dict[str, Any]) -> None:
    print(f"L={result['labeled']} (detector {result['detector_train']}, proxy val {result['proxy_val']}), "
          f"B={result['budget']}, {result['batches_done']} batches with real gains "
          f"({result['trainings_done']} trainings{'' if result['complete'] else ', incomplete'})")
    print("batch kind             true obj  pred count  real ΔmAP  " + "  ".join(
        f"{n[:13]:>13s}" for n in result["batches"][0]["estimators"]))
    for k, b in enumerate(result["batches"]):
        delta = f"{np.mean(b['real_delta']):+9.4f}" if b["real_delta"] else "        -"
        print(f"{k:5d} {b['kind']:16s} {b['true_objects']:8d} {b['predicted_count']:11.0f} {delta}  "
              + "  ".join(f"{v:+13.5f}" for v in b["estimators"].values()))
    print("estimator / reference     Spearman rho  [bootstrap 95%]   s/record  one-off s")
    for name, row in result["rho"].items():
        print(f"  {name:24s} {row['rho']:+6.3f}  [{row['low']:+.2f}, {row['high']:+.2f}]  "
              f"{row['record_s']:9.2f}  {row['setup_s']:9.1f}")
    n = result["real_noise"]
    def fmt(key: str, digits: int) -> str:
        value = n.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"real ΔmAP: std over training seeds {n['within_seed_std']:.4f}, between batches "
          f"{n['between_batch_std']:.4f}; one training's std {fmt('training_std', 4)}, "
          f"reliability {fmt('reliability', 2)} (ρ ceiling {fmt('ceiling', 2)})")


def markdown(result: dict[str, Any]) -> str:
    """The table of a result file as Markdown (what the README and docs/rewards.md show)."""
    status = "complete" if result["complete"] else "incomplete"
    lines = [
        f"L = {result['labeled']} (detector {result['detector_train']}, proxy validation "
        f"{result['proxy_val']}), B = {result['budget']}, {result['image_size']} px: real ΔmAP of "
        f"{result['batches_done']} batches from {result['trainings_done']} trainings ({status}; seeds "
        f"{', '.join(map(str, result['seeds']))}; trained "
        f"{result.get('real_trainings', 'from the ImageNet trunk, ' + str(result['epochs']) + ' epochs')}), "
        f"measured on BCCD `val` ({result['val']} images).",
        "",
        "| estimator / reference | Spearman ρ | bootstrap 95% | s per record | one-off s |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["rho"].items():
        interval = "—" if np.isnan(row["low"]) else f"[{row['low']:+.2f}, {row['high']:+.2f}]"
        lines.append(f"| {name} | {row['rho']:+.3f} | {interval} | {row['record_s']:.2f} | "
                     f"{row['setup_s']:.1f} |")
    n = result["real_noise"]

    def points(value: float) -> str:
        return "— (one seed so far)" if np.isnan(value) else f"{100 * value:.2f} points"

    lines += ["", f"Real ΔmAP: std over training seeds {points(n['within_seed_std'])}, between batches "
              f"{points(n['between_batch_std'])}."]
    if n.get("reliability") is not None and not np.isnan(n["reliability"]):
        lines += ["", f"One training's noise: {points(n['training_std'])} (std of a batch's gain between "
                  f"seeds); reliability of the batches' mean gains {n['reliability']:.2f}, so no estimator's "
                  f"ρ with them can exceed about {n['ceiling']:.2f}; "
                  + ("the batch means spread no more than the seeds' noise alone predicts (the batches' "
                     "own spread is estimated at 0)." if n["seeds_for_0.8"] is None else
                     f"reliability 0.8 would take {n['seeds_for_0.8']:.0f} training seeds per batch at "
                     "these spreads.")]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="small images, short schedules, 60-image pool, few batches: checks that it runs")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BCCD root (COCO JSON with splits)")
    parser.add_argument("--labeled", type=int, default=None, help="labeled images (default 30, quick 20)")
    parser.add_argument("--budget", type=int, default=None, help="batch size (default: config, quick 5)")
    parser.add_argument("--batches", type=int, default=None, help="random batches (default 8, quick 2)")
    parser.add_argument("--strategies", default=None, help="ignored; the sources are fixed (module doc)")
    parser.add_argument("--seeds", default=None,
                        help="detector training seeds, comma-separated (default 0,1; quick: --seed)")
    parser.add_argument("--proxy-seeds", default=None, help="estimator seeds (default 0,1; quick 0)")
    parser.add_argument("--estimators", default="proxy,pseudo_label,retrospective",
                        help="reward estimators (magral_core.method.rewards.REWARDS), comma-separated")
    parser.add_argument("--estimators-only", action="store_true",
                        help="no new real trainings: estimator values and the cached real gains only")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results" / "reward_fidelity",
                        help="cache of estimator values and real trainings (resumable)")
    parser.add_argument("--pool-limit", type=int, default=None,
                        help="random subset of the pool (default: all of train, quick 60)")
    parser.add_argument("--val-limit", type=int, default=None,
                        help="first images of the val split (default: all, quick 30)")
    parser.add_argument("--warm-epochs", type=int, default=0,
                        help="real trainings warm-start from the round's detector and run this many epochs "
                             "(default 0: from the ImageNet trunk with the configured epochs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="write the table here (after every real training)")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="print the Markdown table of a result file written by --json, and stop")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())), end="")
        return
    result = measure(args)
    print_result(result)
    if args.json:
        _write(args.json, result)


if __name__ == "__main__":
    main()
