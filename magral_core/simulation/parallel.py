"""Independent active-learning curves in parallel processes of one torch thread each.

A task is one seed and a group of strategies. The curves of one seed share their round-0 model (same
initial set, same training seed), so a task trains it once for all its strategies; seeds are spread over
the tasks first, and a seed's strategies are split into groups only when there are fewer seeds than jobs.
Every task runs `run_simulation` in a fresh spawned process on a pickled copy of the learner, writing each
finished round to the shared `RoundStore` (one file per strategy, seed and round, so no two processes
write the same file): a killed run resumes where it stopped, with any number of jobs. Every model is
trained and evaluated with the seeds the serial run uses, so the records equal the serial run's up to
their timings (and, for a torch learner, up to the floating-point effect of a different thread count).
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from magral_core.method.strategies import MagralSettings
from magral_core.simulation.protocol import (
    Learner,
    RoundRecord,
    RoundStore,
    SimulationSettings,
    make_factory,
    run_simulation,
)

log = logging.getLogger(__name__)


def plan_tasks(
    strategies: tuple[str, ...], seeds: tuple[int, ...], jobs: int
) -> list[tuple[int, tuple[str, ...]]]:
    """(seed, strategies) tasks covering every strategy × seed once: each seed's strategies in
    ceil(jobs / seeds) groups of consecutive names (at most one group per strategy). Raises ValueError for
    jobs < 1 or no strategies or seeds."""
    if jobs < 1 or not strategies or not seeds:
        raise ValueError(f"need jobs >= 1, strategies and seeds; found {jobs}, {strategies}, {seeds}")
    groups = min(len(strategies), -(-jobs // len(seeds)))
    size, extra = divmod(len(strategies), groups)
    chunks, start = [], 0
    for g in range(groups):
        stop = start + size + (1 if g < extra else 0)
        chunks.append(strategies[start:stop])
        start = stop
    return [(seed, chunk) for seed in seeds for chunk in chunks]


def run_parallel(
    learner: Learner,
    settings: SimulationSettings,
    *,
    jobs: int,
    store: RoundStore,
    magral: MagralSettings | None = None,
    threads: int = 1,
    torch_seed: int = 0,
    log_level: str = "INFO",
) -> list[RoundRecord]:
    """Every strategy × seed curve in `jobs` processes (see module docstring), in `run_simulation`'s order
    (strategy, then seed, then round). `learner` must pickle; strategies come from `make_factory(magral)`;
    each process gives torch `threads` threads and seeds torch's global generator with `torch_seed`, as
    the serial command does. A task's error is raised here once the running tasks have stopped."""
    tasks = [replace(settings, strategies=names, seeds=(seed,))
             for seed, names in plan_tasks(settings.strategies, settings.seeds, jobs)]
    results: dict[tuple[str, int], list[RoundRecord]] = {}

    def collect(records: list[RoundRecord]) -> None:
        for rec in records:
            results.setdefault((rec.strategy, rec.seed), []).append(rec)

    for task in (t for t in tasks if _stored(store, t)):  # only reads the store: no process needed
        collect(run_simulation(learner, task, store=store))
    todo = [t for t in tasks if not _stored(store, t)]
    if todo:
        context = multiprocessing.get_context("spawn")  # a fork of a process that has run torch may hang
        start = (threads, torch_seed, log_level)
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context,
                                 initializer=_start_worker, initargs=start) as pool:
            futures: list[Future[list[RoundRecord]]] = [
                pool.submit(_run_task, learner, task, magral, store.root) for task in todo]
            try:
                for future in futures:
                    collect(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    return [rec for name in settings.strategies for seed in settings.seeds for rec in results[(name, seed)]]


def _stored(store: RoundStore, task: SimulationSettings) -> bool:
    """Whether every round of every curve of `task` is in `store`."""
    return all(store.path(name, seed, r).is_file() for name in task.strategies for seed in task.seeds
               for r in range(task.rounds + 1))


def _start_worker(threads: int, torch_seed: int, log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from magral_core.vision.engine import setup_torch

    setup_torch(threads)
    torch.manual_seed(torch_seed)


def _run_task(learner: Any, settings: SimulationSettings, magral: MagralSettings | None, root: Path
              ) -> list[RoundRecord]:
    from magral_core.vision.engine import machine_fingerprint

    return run_simulation(learner, settings, factory=make_factory(magral), store=RoundStore(root),
                          log=_log_round, machine=machine_fingerprint())


def _log_round(rec: RoundRecord) -> None:
    log.info("strategy=%s seed=%d round=%d n_labeled=%d map=%.4f ap50=%.4f seconds=%.1f", rec.strategy,
             rec.seed, rec.round, rec.n_labeled, rec.map, rec.ap50, rec.seconds)
