"""`magral simulate`: active-learning curves of several strategies and seeds on a fully labeled dataset.

The pool is one split (images that may be labeled), results are measured on another (`--test-split`) that
selection never sees. Learners: "detector" (the configured detector, retrained from the ImageNet trunk each
round with the configured schedule, or with `--warm-start` from the curve's previous model as the service's
rounds are; MAGRAL's proxy is `magral_core.method.proxy` on a validation part carved from the
labeled set) and "toy" (closed-form metrics, for dry runs of the protocol). Every finished round is saved
under `--store` (default `<out>/rounds/`), so re-running the same command resumes, with any `--jobs`. `--jobs
N` runs the curves in N processes of one torch thread each (`simulation.parallel`). A round ranks a candidate
subset of the unlabeled pool when it is larger than MAGRAL_CANDIDATES_ABOVE, as the service does
(`method.candidates`; MAGRAL_CANDIDATE_FACTOR, MAGRAL_CANDIDATE_CARRY). Writes results.json,
results.csv, paired.csv, summary.md, curve.png and paired.png into `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.cli.progress import StoreProgress, add_progress_flags
from magral_core.config import Config
from magral_core.errors import UserError
from magral_core.method.candidates import CandidateRule
from magral_core.method.policy_training import TrainingSettings
from magral_core.method.strategies import STRATEGIES, MagralSettings
from magral_core.simulation import (
    DetectorLearner,
    Metrics,
    RoundRecord,
    RoundStore,
    SimulationSettings,
    ToyLearner,
    make_factory,
    run_parallel,
    run_simulation,
    write_atomic,
    write_reports,
)

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    """Add the `simulate` sub-command."""
    parser = sub.add_parser("simulate", help="active-learning curves on a fully labeled dataset",
                            description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--learner", choices=("detector", "toy"), default="detector",
                        help="detector (default) or toy (closed-form stand-in)")
    parser.add_argument("--data", type=Path,
                        help="dataset (COCO dir/json, VOC dir, LS export); detector only")
    parser.add_argument("--pool-split", default="train",
                        help="split the strategies choose from (default train)")
    parser.add_argument("--test-split", default="test", help="split results are measured on (default test)")
    parser.add_argument("--toy-pool", type=int, default=200,
                        help="pool size of the toy learner (default 200)")
    parser.add_argument("--strategies", default="random,entropy_max,coreset,magral",
                        help=f"comma-separated, from {', '.join(STRATEGIES)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--initial", type=int, default=20, help="initial random labeled images (default 20)")
    parser.add_argument("--budget", type=int, default=None, help="images per round (default: config)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds after the initial one (default 5)")
    parser.add_argument("--full-pool", action="store_true",
                        help="also train on the whole pool: the upper bound and the 95%% target")
    parser.add_argument("--warm-start", action="store_true",
                        help="train each round from the previous round's model of its curve, as the "
                             "service's rounds do (MAGRAL_WARM_EPOCHS sets its epochs); default: from the "
                             "ImageNet trunk")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes running independent curves, one torch thread each (default 1: this "
                             "process, with the configured threads)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--store", type=Path, default=None,
                        help="directory of the finished rounds (default <out>/rounds); elsewhere keeps --out "
                             "small enough to commit, e.g. under docs/results/")
    add_progress_flags(parser)
    parser.set_defaults(handler=run)


def _csv(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"--{what} needs at least one value, found {text!r}")
    return items


def parse_settings(args: argparse.Namespace, config: Config) -> SimulationSettings:
    """The protocol from the command line; raises UserError naming the bad flag."""
    strategies = _csv(args.strategies, "strategies")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise UserError(f"--strategies: unknown {unknown}; expected names from {', '.join(STRATEGIES)}")
    try:
        seeds = tuple(int(s) for s in _csv(args.seeds, "seeds"))
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, found {args.seeds!r}") from None
    budget = args.budget if args.budget is not None else config.budget
    for flag, value, low in (("initial", args.initial, 1), ("budget", budget, 1), ("rounds", args.rounds, 0)):
        if value < low:
            raise UserError(f"--{flag} must be >= {low}, found {value}")
    return SimulationSettings(args.initial, budget, args.rounds, tuple(strategies), seeds,
                              CandidateRule(config.candidates_above, config.candidate_factor,
                                            config.candidate_carry), warm=args.warm_start)


def build_learner(args: argparse.Namespace, config: Config) -> Any:
    if args.learner == "toy":
        if args.toy_pool < 2:
            raise UserError(f"--toy-pool must be >= 2, found {args.toy_pool}")
        return ToyLearner(args.toy_pool)
    if args.data is None:
        raise UserError("--data is required with --learner detector")
    from magral_core.cli.train import split_of
    from magral_core.datasets import load_dataset

    dataset = load_dataset(args.data)
    return DetectorLearner(split_of(dataset, args.pool_split), split_of(dataset, args.test_split), config)


def round_files(store: RoundStore, settings: SimulationSettings) -> list[tuple[str, Path]]:
    """(label, file) of every round the run will have stored, in the order the serial run makes them."""
    return [(f"{name} seed {seed} round {r}", store.path(name, seed, r)) for name in settings.strategies
            for seed in settings.seeds for r in range(settings.rounds + 1)]


def run(args: argparse.Namespace, config: Config) -> int:
    settings = parse_settings(args, config)
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, found {args.jobs}")
    learner = build_learner(args, config)
    if settings.initial > learner.pool_size:
        raise UserError(f"--initial {settings.initial} exceeds the pool of {learner.pool_size} images")
    import torch

    from magral_core.vision.engine import machine_fingerprint, setup_torch

    setup_torch(config.torch_threads)
    torch.manual_seed(config.seed)
    magral = MagralSettings(records=config.lut_records, neighbours=config.lut_neighbours,
                            training=TrainingSettings(updates=config.policy_episodes))

    def report(rec: RoundRecord) -> None:
        log.info("strategy=%s seed=%d round=%d n_labeled=%d map=%.4f ap50=%.4f seconds=%.1f", rec.strategy,
                 rec.seed, rec.round, rec.n_labeled, rec.map, rec.ap50, rec.seconds)

    store = RoundStore(args.store or args.out / "rounds")
    with StoreProgress(round_files(store, settings), enabled=args.progress):
        if args.jobs > 1:
            records = run_parallel(learner, settings, jobs=args.jobs, store=store, magral=magral,
                                   torch_seed=config.seed, log_level=config.log_level)
        else:
            records = run_simulation(learner, settings, factory=make_factory(magral), store=store,
                                     log=report, machine=machine_fingerprint())
    full = None
    if args.full_pool:
        full_path = store.root / "full_pool.json"
        if full_path.is_file():
            full = Metrics(**json.loads(full_path.read_text()))
        else:
            full = learner.evaluate(learner.train(np.arange(learner.pool_size), seed=config.seed))
            write_atomic(full_path, json.dumps(full.__dict__))
    paths = write_reports(args.out, records, full_pool=full)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
