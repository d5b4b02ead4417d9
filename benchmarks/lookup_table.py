"""Look-up-table cost on BCCD: one record of the cached-feature proxy against one full proxy training, and
the time of every component of a MAGRAL round.

    OMP_NUM_THREADS=1 python -m benchmarks.lookup_table [--quick] [--data DIR] [--json PATH]

Setup (`setup_round`): the pool is BCCD `train`; a seeded random labeled set is drawn from it and the task
detector is trained with the configured schedule (`--quick`: a short one on small images) on the labeled set
less the proxy's validation part (`proxy.split_validation`, the split `proxy.make_proxy` uses), as the
service holds its validation tasks out of training; the test split is never read.

Part 1, one record. `proxy` = `proxy.CachedProxy` as production computes it: the one-off caching of frozen
outputs (labeled training part with targets, validation part, every pool image) is timed on its own
(`caching_s`), then each record (head training + validation mAP) is timed; its share of the caching is
`caching_s / records`. `full` = the same semi-supervised objective (detection loss on the labeled training
part + w(t)·flip consistency on the batch, the same steps, learning rate and ramp, one labeled and one
unlabeled image per step) with the whole detector trained end to end from the task detector's weights (every
parameter the detector trains; RPN losses included), no caching, then validation mAP. Decoded images are
prepared before either is timed. Prints `full / (record + share)` (one proxy shared by a round's records,
as the simulator and `fit_magral` use it) and `full / record job` (the service's record job loads the
round's saved proxy cache into a fresh proxy, then computes its record).

Part 2, a round: detector training, feature extraction (pool + labeled embeddings, detections, features),
the proxy's caching, look-up-table records (initial random ones, computed before the fit as a queue would,
plus the near-policy ones `fit_magral` asks for), policy training (the rest of `fit_magral`: estimators and
REINFORCE) and ranking. Wall times depend on what else runs on the machine; CPU seconds are printed too.

Part 3 (`--fidelity-records N`, 0 skips it): how much signal the reward has. N more uniformly random
records of the same proxy; the first 16 computed again with another proxy seed (test-retest Spearman ρ of
a record: the ceiling of any estimator) and the spread between batches against the spread between the
two seeds; then each estimator's 4-fold cross-validated Spearman ρ on the N records, trained on three
quarters of them and, as in a round, on `records` of them.

Kept as one module because it is one benchmark command whose measurements share one round setup.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.cli.progress import track

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "bccd"


@dataclass
class Timer:
    """Wall and process-CPU seconds per named block."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu


@dataclass
class RoundSetup:
    """A round on BCCD: the config used, the pool (`train` split), labeled/unlabeled positions in it, the
    labeled ones split into the detector's training part and the proxy's validation part
    (`proxy.split_validation`), and the task detector trained on the training part only."""

    config: Any
    dataset: Any
    pool: Any
    labeled: np.ndarray
    unlabeled: np.ndarray
    model: Any
    train_report: Any
    train_part: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    val_part: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def quick_config(config: Any) -> Any:
    """A short schedule on small images, for checking that a benchmark runs (minutes on one core)."""
    return replace(config, image_size=256, epochs=2, batch_size=4)


def setup_round(data: Path, config: Any, *, labeled: int, pool_limit: int | None, seed: int,
                timer: Timer) -> RoundSetup:
    """Load BCCD, draw `labeled` pool images (seeded) and train the task detector on them less the proxy's
    validation part (`proxy.split_validation` with `config.seed`, timed as "train")."""
    from magral_core.datasets import load_dataset
    from magral_core.method.proxy import split_validation
    from magral_core.vision.detectors import build_detector
    from magral_core.vision.engine import train_detector

    dataset = load_dataset(data)
    pool = dataset.split("train")
    if pool_limit is not None:
        pool = pool.subset(np.random.default_rng(seed).permutation(len(pool))[:pool_limit].tolist())
    if not 2 <= labeled < len(pool):
        raise SystemExit(f"--labeled must be within [2, {len(pool) - 1}], found {labeled}")
    order = np.random.default_rng(seed + 1).permutation(len(pool))
    lab, unl = np.sort(order[:labeled]), np.sort(order[labeled:])
    train_part, val_part = split_validation(lab, config.seed)
    model = build_detector(config.detector, num_classes=pool.num_classes, image_size=config.image_size,
                           weights_dir=config.weights_dir, seed=seed)
    with timer("train"):
        report = train_detector(model, pool.subset(train_part.tolist()), epochs=config.epochs,
                                batch_size=config.batch_size, learning_rate=config.learning_rate, seed=seed,
                                device=config.device)
    return RoundSetup(config, dataset, pool, lab, unl, model, report, train_part, val_part)


@dataclass
class BenchSetup:
    """What both BCCD round benchmarks start from: the config, a timer, the batch size, the proxy's
    schedule and the round with its task detector trained."""

    config: Any
    timer: Timer
    budget: int
    settings: Any
    round: RoundSetup


def bench_setup(args: argparse.Namespace) -> BenchSetup:
    """Config (`--quick`: `quick_config`), torch threads, then `setup_round` with the shared flags
    (`--labeled`, `--budget`, `--pool-limit`, `--seed`) and their quick defaults."""
    from magral_core.config import Config
    from magral_core.method.proxy import ProxySettings
    from magral_core.vision.engine import setup_torch

    config = Config.from_env()
    config = quick_config(config) if args.quick else config
    setup_torch(args.threads)
    timer = Timer()
    labeled = args.labeled or (20 if args.quick else 30)
    budget = args.budget or (5 if args.quick else config.budget)
    settings = ProxySettings(epochs=2 if args.quick else ProxySettings.epochs,
                             score_threshold=config.score_threshold)
    pool_limit = args.pool_limit or (60 if args.quick else None)
    r = setup_round(args.data, config, labeled=labeled, pool_limit=pool_limit, seed=args.seed, timer=timer)
    return BenchSetup(config, timer, budget, settings, r)


def full_proxy(model: Any, train: Any, pool: Any, batch: Sequence[int], val: Any, settings: Any, *, seed: int,
               caches: dict[str, Any]) -> float:
    """Validation mAP of the whole detector (a copy of `model`) trained end to end on the proxy's objective
    (see module docstring); `caches` hold the decoded images of "train", "pool" and "val"."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    from magral_core.method.proxy import flip_boxes, flip_consistency, ramp
    from magral_core.vision.engine import predict
    from magral_core.vision.evaluation import evaluate_coco

    net: Any = copy.deepcopy(model).train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=settings.learning_rate, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    # unlabeled draws from their own stream: the labeled order is then the same for every batch (and for
    # none), so two records of one seed differ only by what their batches contain
    unlabeled_rng = np.random.default_rng([seed, 1])
    ramp_steps = max(1.0, settings.rampup * settings.epochs * max(1, len(train)))
    heads = net.roi_heads
    step = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(settings.epochs):
            for k in rng.permutation(len(train)):
                image, prepared = train.images[int(k)], caches["train"][int(k)]
                keep = ~image.iscrowd
                target = {"boxes": torch.as_tensor(image.boxes_xyxy[keep], dtype=torch.float32).reshape(-1, 4)
                          * prepared.scale,
                          "labels": torch.as_tensor(image.labels[keep], dtype=torch.int64) + 1}
                loss = sum(net([prepared.pixels.float().div(255.0)], [target]).values())
                if len(batch):
                    u = caches["pool"][int(batch[int(unlabeled_rng.integers(len(batch)))])]
                    pixels = u.pixels.float().div(255.0)  # (3, h, w)
                    images, _ = net.transform([pixels, pixels.flip(-1)])
                    maps = net.backbone(images.tensors)  # {"0": (2, C, h/16, w/16), "1": ...}
                    first = {n: m[:1] for n, m in maps.items()}
                    second = {n: m[1:] for n, m in maps.items()}
                    net.rpn.eval()  # proposals as at inference (training mode would ask for targets)
                    with torch.no_grad():
                        one = ImageList(images.tensors[:1], images.image_sizes[:1])
                        proposals = net.rpn(one, first)[0][0]
                    net.rpn.train()
                    proposals = proposals[: settings.unlabeled_rois]  # (P, 4)
                    size = images.image_sizes[0]
                    a = heads.box_predictor(heads.box_head(heads.box_roi_pool(first, [proposals], [size])))
                    b = heads.box_predictor(heads.box_head(
                        heads.box_roi_pool(second, [flip_boxes(proposals, size[1])], [size])))
                    weight = settings.consistency_weight * ramp(step / ramp_steps)
                    loss = loss + weight * flip_consistency(a[0], b[0], a[1], b[1])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                optimiser.step()
                step += 1
    net.eval()
    detections = predict(net, val, score_threshold=settings.score_threshold, cache=caches["val"])
    value = evaluate_coco(val, detections).map
    return 0.0 if np.isnan(value) else float(value)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from magral_core.method.lookup_table import compute_record
    from magral_core.method.policy_training import TrainingSettings
    from magral_core.method.proxy import make_proxy
    from magral_core.method.strategies import MagralSettings, fit_magral, initial_record_specs
    from magral_core.simulation import DetectorLearner

    setup = bench_setup(args)
    config, timer, budget, settings, r = setup.config, setup.timer, setup.budget, setup.settings, setup.round
    records = args.records or (4 if args.quick else config.lut_records)
    updates = args.updates or (20 if args.quick else config.policy_episodes)
    print(f"pool={len(r.pool)} labeled={len(r.labeled)} image_size={config.image_size} "
          f"epochs={config.epochs} budget={budget} records={records} proxy_epochs={settings.epochs} "
          f"threads={torch.get_num_threads()}", flush=True)

    # Round part 1: features of the unlabeled and labeled pool images (the `val` split is never evaluated).
    learner = DetectorLearner(r.pool, r.dataset.split("val"), config)
    with timer("features"):
        pool = learner.pool(r.model, r.unlabeled, r.labeled)

    # The production proxy: decode images first (not timed, the full proxy gets them decoded too), then the
    # one-off caching of frozen outputs, then records.
    proxy = make_proxy(r.model, r.pool, r.labeled, r.unlabeled, settings, seed=config.seed)
    for frozen in (proxy.train, proxy.pool, proxy.val):
        for i in range(len(frozen.dataset)):
            frozen.images[i]
    with timer("caching"):
        proxy.warm(range(len(r.unlabeled)))
    magral = MagralSettings(records=records, neighbours=config.lut_neighbours,
                            training=TrainingSettings(updates=updates))
    specs = initial_record_specs(len(r.unlabeled), budget, magral, seed=args.seed)
    done, record_s = [], []
    for spec in track(specs, desc="records", unit="record"):
        with timer("records"):
            start = time.perf_counter()
            done.append(compute_record(spec, proxy))
            record_s.append(time.perf_counter() - start)

    # A record job of the service (`service.magral_round.MagralRound.record`) loads the round's saved
    # proxy cache (written once by the round's first stage) into a fresh proxy and computes its record.
    with tempfile.TemporaryDirectory() as tmp:
        proxy.save(Path(tmp) / "proxy_cache.pt")
        start = time.perf_counter()
        cold = make_proxy(r.model, r.pool, r.labeled, r.unlabeled, settings, seed=config.seed)
        cold.load(Path(tmp) / "proxy_cache.pt")
        compute_record(specs[0], cold)
        job_s = time.perf_counter() - start

    # Part 1: one full proxy training on the first record's batch, same seed.
    caches = {"train": proxy.train.images, "pool": proxy.pool.images, "val": proxy.val.images}
    start, cpu = time.perf_counter(), time.process_time()
    full_map = full_proxy(r.model, proxy.train.dataset, proxy.pool.dataset, list(specs[0].indices),
                          proxy.val.dataset, settings, seed=specs[0].seed, caches=caches)
    full_s, full_cpu = time.perf_counter() - start, time.process_time() - cpu

    # Round part 2: the fit (near-policy records timed apart from policy training) and the ranking.
    def timed_proxy(batch: np.ndarray, seed: int) -> float:
        with timer("records"):
            start = time.perf_counter()
            value = proxy(batch, seed)
            record_s.append(time.perf_counter() - start)
        return value

    assert pool.features is not None
    start, cpu = time.perf_counter(), time.process_time()
    before, before_cpu = timer.wall["records"], timer.cpu["records"]
    strategy, report = fit_magral(pool.features, budget, timed_proxy, magral, seed=args.seed, records=done)
    timer.wall["policy_training"] = time.perf_counter() - start - (timer.wall["records"] - before)
    timer.cpu["policy_training"] = time.process_time() - cpu - (timer.cpu["records"] - before_cpu)
    with timer("ranking"):
        strategy.rank(pool, budget, np.random.default_rng(args.seed))

    study = fidelity_study(proxy, len(r.unlabeled), budget, pool.features, config.lut_neighbours,
                           args.fidelity_records, records, seed=args.seed) if args.fidelity_records else None

    n_records = len(record_s)
    share = timer.wall["caching"] / n_records
    record = float(np.median(record_s))
    result = {
        "quick": args.quick, "pool": len(r.pool), "labeled": len(r.labeled),
        "val_part": len(proxy.val.dataset),
        "image_size": config.image_size, "epochs": config.epochs, "budget": budget, "records": n_records,
        "proxy_epochs": settings.epochs, "threads": torch.get_num_threads(),
        "record_s_median": record, "record_s": record_s, "caching_s": timer.wall["caching"],
        "caching_images": len(proxy.train.dataset) + len(proxy.val.dataset) + len(r.unlabeled),
        "caching_share_s": share, "full_proxy_s": full_s, "full_proxy_cpu_s": full_cpu,
        "full_proxy_map": full_map, "record_map": done[0].value,
        "ratio": full_s / (record + share), "ratio_without_caching": full_s / record,
        "record_job_s": job_s, "ratio_record_job": full_s / job_s,
        "configured_records": config.lut_records,
        "ratio_at_configured_records": full_s / (record + timer.wall["caching"] / config.lut_records),
        "round_wall_s": dict(timer.wall), "round_cpu_s": dict(timer.cpu),
        "lut_fidelity": report.fidelity, "estimators": report.estimator, "fidelity_study": study,
        "train_report": asdict(r.train_report),
    }
    return result


def fidelity_study(proxy: Any, pool_size: int, budget: int, features: np.ndarray, neighbours: int,
                   count: int, round_records: int, *, seed: int) -> dict[str, Any]:
    """Part 3 (see the module docstring)."""
    from magral_core.method.lookup_table import (
        candidate_estimators,
        compute_record,
        random_batches,
        spearman,
        specs,
    )

    rng = np.random.default_rng([seed, 3])
    batches = random_batches(pool_size, budget, count, rng)
    recs = [compute_record(spec, proxy)
            for spec in track(specs(batches, "random", seed=seed), desc="fidelity records", unit="record")]
    values = np.array([r.value for r in recs])
    retest = min(16, count)
    again = np.array([proxy(b, seed + 1) for b in batches[:retest]])
    folds = np.array_split(rng.permutation(count), 4)
    cv: dict[str, dict[str, float]] = {}
    for name, make in candidate_estimators(pool_size, neighbours=neighbours, features=features).items():
        cv[name] = {}
        for label, size in (("three_quarters", count), ("round_records", round_records)):
            estimated, actual = [], []
            for test in folds:
                held = set(test.tolist())
                train = [recs[i] for i in range(count) if i not in held][:size]
                estimated += list(make(train).estimate_many([recs[i].indices for i in test]))
                actual += [recs[i].value for i in test]
            cv[name][label] = spearman(np.array(estimated), np.array(actual))
    return {
        "records": count, "round_records": round_records, "value_mean": float(values.mean()),
        "between_batches_std": float(values.std(ddof=1)),
        "between_seeds_std": float(np.std(values[:retest] - again, ddof=1) / np.sqrt(2)),
        "retest_rho": spearman(values[:retest], again), "cv_rho": cv,
    }


def print_result(result: dict[str, Any]) -> None:
    print(f"record (cached proxy): {result['record_s_median']:.2f} s median of {result['records']}, "
          f"+ caching share {result['caching_share_s']:.2f} s ({result['caching_s']:.1f} s for "
          f"{result['caching_images']} images / {result['records']} records); "
          f"val mAP {result['record_map']:.4f}")
    print(f"full proxy (end to end): {result['full_proxy_s']:.1f} s "
          f"(cpu {result['full_proxy_cpu_s']:.1f} s); val mAP {result['full_proxy_map']:.4f}")
    print(f"ratio full / (record + share) = {result['ratio']:.1f}x (goal >= 20x); "
          f"without the caching share {result['ratio_without_caching']:.1f}x; with the share of "
          f"{result['configured_records']} records (the configured count) "
          f"{result['ratio_at_configured_records']:.1f}x")
    print(f"a service record job (a fresh proxy loading the round's saved cache, then the record): "
          f"{result['record_job_s']:.1f} s; ratio {result['ratio_record_job']:.1f}x")
    total = sum(result["round_wall_s"].values())
    print("round components (wall s, cpu s, share of the round):")
    for name in ("train", "features", "caching", "records", "policy_training", "ranking"):
        wall = result["round_wall_s"].get(name, 0.0)
        cpu = result["round_cpu_s"].get(name, float("nan"))
        print(f"  {name:16s} {wall:8.1f} {cpu:8.1f} {100 * wall / total:5.1f}%")
    study = result.get("fidelity_study")
    if study:
        print(f"reward signal over {study['records']} random records: value {study['value_mean']:.4f}, "
              f"std between batches {study['between_batches_std']:.4f}, between proxy seeds "
              f"{study['between_seeds_std']:.4f}; test-retest rho {study['retest_rho']:.2f}")
        for name, rho in study["cv_rho"].items():
            print(f"  {name:16s} cross-validated rho: trained on 3/4 {rho['three_quarters']:+.2f}, "
                  f"on {study['round_records']} records {rho['round_records']:+.2f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="small images, short schedules, 60-image pool: checks that it runs")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BCCD root (COCO JSON with splits)")
    parser.add_argument("--labeled", type=int, default=None, help="labeled images (default 30, quick 20)")
    parser.add_argument("--budget", type=int, default=None, help="batch size (default: config, quick 5)")
    parser.add_argument("--records", type=int, default=None,
                        help="look-up-table records (default: config, quick 4)")
    parser.add_argument("--updates", type=int, default=None,
                        help="policy-gradient updates (default: config policy_episodes, quick 20)")
    parser.add_argument("--pool-limit", type=int, default=None,
                        help="random subset of the pool (default: all of train, quick 60)")
    parser.add_argument("--fidelity-records", type=int, default=0,
                        help="part 3: random records for the reward-signal study (default 0: skipped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.fidelity_records and args.fidelity_records < 8:
        parser.error(f"--fidelity-records must be 0 or >= 8, found {args.fidelity_records}")
    result = measure(args)
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
