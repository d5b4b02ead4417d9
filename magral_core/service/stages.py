"""One active-learning round of a Label Studio project, as stages over a staging directory, each a short
orchestration of components (`RoundSteps` for the model, `RoundStrategy` for the strategy, `service.tasks`
for tasks → images, `service.staging` for the files).

1. `prepare`: fetch every task and annotation through the client (a webhook is only a trigger), train the
   detector warm-started from the served version on the labeled tasks less the validation ones, evaluate it
   on those, run it once over the unlabeled pool (detections + embeddings), let the strategy prepare what
   its record jobs share, and write the plan.
2. `lut_record(i)`: one record of the strategy (independent of the others, so they run in parallel as
   separate jobs; MAGRAL's look-up table, none for a heuristic). `propose`: after the first records, the
   strategy asks for more (MAGRAL: records near its policy), computed by `lut_record` in the same way.
3. `finish`: rank the pool with the strategy, push a prediction (boxes + score, best task lowest) for every
   unlabeled task under the new model version, switch Label Studio to serve in that order, write the
   ranking and metrics and publish the version in the store.

`run_round` runs every stage in one process (tests, a single worker).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.config import Config
from magral_core.method.features import detection_stats
from magral_core.service import staging as files
from magral_core.service.predict import task_results
from magral_core.service.stage_clock import StageClock, merge_seconds
from magral_core.service.staging import RoundPlan
from magral_core.service.steps import Progress, RoundSteps, StudioClient
from magral_core.service.store import ModelStore
from magral_core.service.tasks import round_images
from magral_core.structures import Detections
from magral_core.studio.label_config import merge_class_names, parse_label_config
from magral_core.studio.results import scores_from_order, task_prediction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundContext:
    """What every stage of a round runs with: the process's config, the model's steps and a progress
    callback."""

    config: Config
    steps: RoundSteps
    progress: Progress


def json_safe(value: Any) -> Any:
    """NaN/inf (e.g. the AP of a class absent from the validation images) → None, recursively, so metrics
    are valid JSON for `/status`."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def choose_strategy(n_labeled: int, n_unlabeled: int, config: Config) -> str:
    """MAGRAL once `min_labeled_for_magral` labeled images exist and the pool is larger than the batch (when
    the whole pool is the batch there is no choice to learn), else the fallback strategy."""
    if n_labeled >= config.min_labeled_for_magral and n_unlabeled > config.budget:
        return "magral"
    return config.fallback_strategy


# --- stage 1 ---
def prepare(
    project: int, version: str, staging: Path, client: StudioClient, store: ModelStore, ctx: RoundContext
) -> RoundPlan:
    """Fetch, train, evaluate, extract; write the plan, detector and pool arrays into `staging`.

    Raises UserError when the project's label config has no box control or no task is annotated.
    """
    config, steps = ctx.config, ctx.steps
    progress = clock = StageClock(ctx.progress)  # per-stage seconds for the round's metrics
    progress("fetching", 0.0)
    label_config = parse_label_config(str(client.get_project(project).get("label_config", "")))
    previous = store.current_version(project)
    previous_names = tuple(store.load_metrics(project, previous).get("class_names", ())) if previous else ()
    class_names = merge_class_names(previous_names, label_config.labels)
    tasks = list(client.list_tasks(project, image_key=label_config.image_key))
    images = round_images(project, tasks, label_config, class_names, client, progress)
    strategy_name = choose_strategy(len(images.labeled), len(images.pool), config)
    log.info("project=%s version=%s n_labeled=%d n_unlabeled=%d strategy=%s",
             project, version, len(images.labeled), len(images.pool), strategy_name)

    train_set, val_set, pool_set = images.train, images.val, images.pool_set
    previous_dir = store.version_dir(project, previous) if previous else None
    model = steps.train(train_set, previous_dir, config, progress)
    metrics: dict[str, Any] = {"map": None, "ap50": None, "per_class_ap": {}}
    if val_set is not None:
        progress("evaluating", 0.0)
        metrics = json_safe(dict(steps.evaluate(val_set, steps.extract(model, val_set, config)[0])))
    progress("scoring", 0.0)
    detections, embeddings = (
        steps.extract(model, pool_set, config) if len(pool_set) else ([], np.zeros((0, 0)))
    )
    _, labeled_embeddings = steps.extract(model, train_set, config)
    steps.save_model(model, staging / files.DETECTOR_FILE,
                     {"version": version, "class_names": list(class_names), "project": project,
                      "metrics": metrics})
    files.save_pool(
        staging / files.POOL_FILE, detections, np.asarray(embeddings), np.asarray(labeled_embeddings)
    )
    files.save_images(staging / files.IMAGES_FILE, {"train": train_set, "val": val_set, "pool": pool_set})

    strategy = steps.strategy(strategy_name, config)
    records = strategy.records(len(images.pool))
    if records:
        progress("caching", 0.0)
        strategy.prepare(staging)  # once here, so the record jobs only load it
    metrics.update(stage_seconds=clock.seconds(), started_at=clock.started, prepared_at=time.time())
    plan = RoundPlan(
        project, version, class_names, asdict(label_config), strategy_name, records,
        tuple(i.image_id for i in images.labeled),
        tuple(i.image_id for i in val_set.images) if val_set is not None else (),
        images.pool_tasks, images.skipped, metrics,
    )
    plan.save(staging)
    return plan


# --- stage 2 ---
def lut_record(staging: Path, index: int, ctx: RoundContext) -> Path:
    """Compute record `index` of the round's strategy and write it (see `staging.write_lut_record`)."""
    plan = RoundPlan.load(staging)
    record = ctx.steps.strategy(plan.strategy, ctx.config).record(staging, index)
    return files.write_lut_record(staging, index, record)


def propose(staging: Path, ctx: RoundContext) -> range:
    """After the first records: the indices of the records the strategy asks for next (empty when the round
    has no records)."""
    plan = RoundPlan.load(staging)
    if not plan.lut_records:
        return range(0)
    more = ctx.steps.strategy(plan.strategy, ctx.config).propose(staging, files.load_lut_records(staging))
    return range(plan.lut_records, plan.lut_records + more)


# --- stage 3 ---
def finish(staging: Path, client: StudioClient, store: ModelStore, ctx: RoundContext) -> str:
    """Rank, push predictions, serve in ranked order, publish. Returns the published version."""
    config = ctx.config
    plan = RoundPlan.load(staging)
    progress = clock = StageClock(ctx.progress)
    # between the two processes: the record jobs and the policy (MAGRAL), else the wait in the queue
    prepared_at = float(plan.metrics.get("prepared_at", clock.started))
    between = {"lookup_table" if plan.lut_records else "queued": clock.started - prepared_at}
    arrays = files.load_pool(staging / files.POOL_FILE)
    records = files.load_lut_records(staging)
    progress("ranking", 0.0)
    n = len(plan.pool)
    strategy = ctx.steps.strategy(plan.strategy, config)
    order, priorities = strategy.rank(arrays, records, staging) if n else ([], [])
    for done_with in files.UNPUBLISHED:
        (staging / done_with).unlink(missing_ok=True)
    scores = scores_from_order(order, n)
    predictions = [
        task_prediction(
            task.task,
            task_results(arrays["detections"][i], task.width, task.height, class_names=plan.class_names,
                         label_config=plan.config, config=config),
            float(scores[i]),
            plan.version,
        )
        for i, task in enumerate(plan.pool)
    ]
    files.save_predictions(staging, predictions)
    files.save_ranking(staging, {
        "version": plan.version,
        "strategy": plan.strategy,
        "task_ids": [plan.pool[i].task for i in order],
        "scores": [float(scores[i]) for i in order],
        "priorities": [float(p) for p in priorities],
        "prediction_threshold": config.prediction_threshold,
        **task_signals([arrays["detections"][i] for i in order], config.prediction_threshold),
    })
    metrics = dict(
        plan.metrics,
        version=plan.version,
        strategy=plan.strategy,
        class_names=list(plan.class_names),
        n_labeled=len(plan.labeled_tasks),
        n_validation=len(plan.validation_tasks),
        n_unlabeled=n,
        lut_records=len(records),
        skipped=plan.skipped,
    )
    progress("pushing", 0.0)
    if predictions:
        client.import_predictions(plan.project, predictions)
    client.serve_in_ranked_order(plan.project, plan.version)
    metrics["stage_seconds"] = merge_seconds(plan.metrics.get("stage_seconds", {}), between, clock.seconds())
    metrics["duration_s"] = round(time.time() - float(plan.metrics.get("started_at", clock.started)), 3)
    files.save_metrics(staging, metrics)
    store.publish(plan.project, staging, plan.version)
    log.info("project=%s version=%s published map=%s n_labeled=%d n_predictions=%d", plan.project,
             plan.version, metrics.get("map"), len(plan.labeled_tasks), len(predictions))
    return plan.version


def task_signals(detections: Sequence[Detections], threshold: float) -> dict[str, list[Any]]:
    """What the ranking shows per task (same order as `detections`): `boxes` shown to annotators (score >=
    `threshold`), `best_scores` (highest box score, None without a detection) and `uncertainties` (the
    largest class entropy in nats among the top detections, `features.detection_stats`)."""
    return {
        "boxes": [int((np.asarray(d.scores) >= threshold).sum()) for d in detections],
        "best_scores": [round(float(np.max(d.scores)), 4) if len(d) else None for d in detections],
        "uncertainties": [round(float(detection_stats(d)[1]), 4) for d in detections],
    }


def run_round(
    project: int,
    *,
    client: StudioClient,
    store: ModelStore,
    config: Config,
    steps: RoundSteps,
    progress: Progress | None = None,
) -> str:
    """Every stage in this process (tests, a single worker); a failure discards the staging directory,
    records the error in the store and re-raises."""
    ctx = RoundContext(config, steps, progress or (lambda stage, fraction: None))
    version = store.reserve_version(project)
    staging = store.begin(project, version)
    try:
        plan = prepare(project, version, staging, client, store, ctx)
        for index in range(plan.lut_records):
            ctx.progress("lookup_table", index / plan.lut_records)
            lut_record(staging, index, ctx)
        for index in propose(staging, ctx):
            lut_record(staging, index, ctx)
        return finish(staging, client, store, ctx)
    except Exception as exc:
        store.discard(staging)
        store.record_error(project, f"{type(exc).__name__}: {exc}", stage="round")
        raise
