"""One active-learning round of a Label Studio project, as stages over a staging directory, each a short
orchestration of components (`RoundSteps` for the model, `RoundStrategy` for the strategy, `service.tasks`
for tasks → images, `service.staging` for the files).

1. `prepare`: fetch every task and annotation through the client (a webhook is only a trigger; above
   `MAGRAL_CANDIDATES_ABOVE` unlabeled tasks only a candidate subset of them, `service.tasks.candidate_tasks`,
   is fetched, scored, ranked and given predictions; the others get theirs from `/predict`), train the
   detector warm-started from the served version on the labeled tasks less the validation ones, evaluate it
   on those, and write the plan. Then the detector runs once over the unlabeled pool (detections +
   embeddings): in `prepare` itself when the pool fits in one scoring chunk (`MAGRAL_SCORING_CHUNK`),
   else as `score_chunk(i)` jobs over consecutive chunks (in parallel, each loading the staged detector)
   and `score_pool` after them, which merges the chunks in pool order. Either way the stage ends by
   letting the strategy prepare what its record jobs share.
2. `lut_record(i)`: one record of the strategy (independent of the others, so they run in parallel as
   separate jobs; MAGRAL's look-up table, none for a heuristic). `propose`: after the first records, the
   strategy asks for more (MAGRAL: records near its policy), computed by `lut_record` in the same way.
3. `finish`: rank the pool with the strategy, write a prediction (boxes + score, best task lowest) for every
   unlabeled task under the new model version, the ranking and metrics, and publish the version in the
   store. Then `announce`: push the published version's predictions and switch Label Studio to serve in
   that order; idempotent, recorded per version, so a re-run completes it. Publishing first means a version
   Label Studio serves is always one the store (and so `/predict`) has.

`abandon` is what happens to a round found dead (its worker killed): its error recorded, its files dropped.
Tasks whose image could not be had are counted per reason in the round's metrics (`bad_input`,
see `service.bad_input`).

`run_round` runs every stage in one process (tests, a single worker). Kept as one module because it is the
one place that says in which order a round does what (and so what a worker killed between two steps leaves).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.config import Config
from magral_core.errors import StoreError
from magral_core.method.candidates import CandidateRule
from magral_core.method.features import detection_stats
from magral_core.service import staging as files
from magral_core.service.bad_input import FetchLog, bad_input_summary
from magral_core.service.predict import task_results
from magral_core.service.stage_clock import StageClock, merge_seconds
from magral_core.service.staging import RoundPlan
from magral_core.service.steps import Progress, RoundSteps, StudioAdmin, StudioClient
from magral_core.service.store import ModelStore, version_number
from magral_core.service.tasks import candidate_tasks, round_images
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
    """Fetch, train, evaluate; write the detector, the image sets, the labeled images' outputs and the plan
    into `staging`. A pool that fits in one scoring chunk (`MAGRAL_SCORING_CHUNK`) is then scored here and
    the stage completes (`score_pool`); a larger one is left to `score_chunk` jobs, one per chunk of the
    plan's `scoring_chunks`, and `score_pool` after them.

    Raises UserError when the project's label config has no box control or no task is annotated.
    """
    config, steps = ctx.config, ctx.steps
    progress = clock = StageClock(ctx.progress)  # per-stage seconds for the round's metrics
    progress("fetching", 0.0)
    label_config = parse_label_config(str(client.get_project(project).get("label_config", "")))
    previous = store.current_version(project)
    previous_names = tuple(store.load_metrics(project, previous).get("class_names", ())) if previous else ()
    class_names = merge_class_names(previous_names, label_config.labels)
    tasks, candidates = candidate_tasks(
        list(client.list_tasks(project, image_key=label_config.image_key)),
        _previous_order(store, project, previous),
        config.budget,
        CandidateRule(config.candidates_above, config.candidate_factor, config.candidate_carry),
        seed=(config.seed, project, version_number(version)),
    )
    fetches = FetchLog(client)
    images = round_images(project, tasks, label_config, class_names, fetches, progress)
    strategy_name = choose_strategy(len(images.labeled), len(images.pool), config)
    log.info("project=%s version=%s n_labeled=%d n_unlabeled=%d strategy=%s",
             project, version, len(images.labeled), len(images.pool), strategy_name)

    train_set, val_set, pool_set = images.train, images.val, images.pool_set
    previous_dir = store.version_dir(project, previous) if previous else None
    model = steps.train(train_set, previous_dir, config, progress, val_set)
    metrics: dict[str, Any] = {"map": None, "ap50": None, "per_class_ap": {}}
    if val_set is not None:
        progress("evaluating", 0.0)
        metrics = json_safe(dict(steps.evaluate(val_set, steps.extract(model, val_set, config)[0])))
    progress("scoring", 0.0)
    steps.save_model(model, staging / files.DETECTOR_FILE,
                     {"version": version, "class_names": list(class_names), "project": project,
                      "metrics": metrics})
    files.save_images(staging / files.IMAGES_FILE, {"train": train_set, "val": val_set, "pool": pool_set})
    labeled_detections, labeled_embeddings = steps.extract(model, train_set, config)
    labeled_embeddings = np.asarray(labeled_embeddings)
    files.save_pool(staging / files.LABELED_FILE, labeled_detections, labeled_embeddings,
                    np.zeros((0, labeled_embeddings.shape[1] if labeled_embeddings.ndim == 2 else 0)))

    # a multiple of the batch size: the chunks batch the pool's images as one pass would
    chunk = -(-config.scoring_chunk // config.batch_size) * config.batch_size
    chunks = files.chunk_bounds(len(pool_set), chunk)
    metrics.update(stage_seconds=clock.seconds(), started_at=clock.started, scoring_from=time.time(),
                   bad_input=bad_input_summary(fetches.failures), candidates=candidates)
    plan = RoundPlan(
        project, version, class_names, asdict(label_config), strategy_name,
        steps.strategy(strategy_name, config).records(len(images.pool)),
        tuple(i.image_id for i in images.labeled),
        tuple(i.image_id for i in val_set.images) if val_set is not None else (),
        images.pool_tasks, images.skipped, metrics,
        scoring_chunks=len(chunks) if len(chunks) > 1 else 0, scoring_chunk=chunk,
    )
    plan.save(staging)
    if plan.scoring_chunks:
        log.info("project=%s version=%s pool of %d images left to %d scoring jobs", project, version,
                 len(pool_set), plan.scoring_chunks)
        return plan
    # one chunk at most: scored here with the detector in memory, no job to wait for
    detections, embeddings = (
        steps.extract(model, pool_set, config) if len(pool_set) else ([], np.zeros((0, 0)))
    )
    files.save_pool(staging / files.POOL_FILE, detections, np.asarray(embeddings), labeled_embeddings)
    return _pool_ready(staging, plan, ctx, clock, {})


def _previous_order(store: ModelStore, project: int, previous: str | None) -> tuple[int, ...]:
    """The served version's ranking (task ids, best first), what a candidate subset carries; () without
    one (or when it cannot be read: the subset is then all random)."""
    if previous is None:
        return ()
    try:
        return store.load_ranking(project, previous).task_ids
    except (StoreError, KeyError, TypeError, ValueError) as exc:
        log.warning("project=%s version=%s: no ranking to carry candidates from (%s)", project, previous, exc)
        return ()


def score_chunk(staging: Path, index: int, ctx: RoundContext, model: Any = None) -> Path:
    """Score chunk `index` of the round's pool (`RoundPlan.scoring_chunks`) with the staged detector (or
    `model`, that detector already loaded): detections and embeddings of its images, in pool order,
    written as the chunk's file (see `staging.write_pool_chunk`); returns its path."""
    plan = RoundPlan.load(staging)
    bounds = files.chunk_bounds(len(plan.pool), plan.scoring_chunk)
    if not 0 <= index < len(bounds):
        raise ValueError(f"scoring chunk {index}: the round's pool has {len(bounds)} chunks")
    start, stop = bounds[index]
    pool = files.load_images(staging / files.IMAGES_FILE)["pool"]
    if pool is None or len(pool) != len(plan.pool):
        raise StoreError(f"expected the {len(plan.pool)} pool images of {staging} in {files.IMAGES_FILE}, "
                         f"found {0 if pool is None else len(pool)}")
    model = model if model is not None else ctx.steps.load_model(staging / files.DETECTOR_FILE)
    detections, embeddings = ctx.steps.extract(model, pool.subset(list(range(start, stop))), ctx.config)
    return files.write_pool_chunk(staging, index, detections, np.asarray(embeddings))


def score_pool(staging: Path, ctx: RoundContext) -> RoundPlan:
    """After the scoring chunks: merge them into the pool file in pool order (a missing chunk raises
    StoreError), then let the strategy prepare what its record jobs share. Returns the plan, now with the
    seconds of stage 1."""
    plan = RoundPlan.load(staging)
    clock = StageClock(ctx.progress)
    # the scoring jobs ran between the two processes
    between = {"scoring": clock.started - float(plan.metrics.get("scoring_from", clock.started))}
    clock("scoring", 1.0)
    labeled = files.load_pool(staging / files.LABELED_FILE)["embeddings"]
    files.merge_pool_chunks(staging, files.chunk_bounds(len(plan.pool), plan.scoring_chunk), labeled)
    before = merge_seconds(plan.metrics.get("stage_seconds", {}), between)
    return _pool_ready(staging, plan, ctx, clock, before)


def score_here(staging: Path, plan: RoundPlan, ctx: RoundContext) -> RoundPlan:
    """What `prepare` left to scoring jobs (if anything), done in this process: every chunk, one after the
    other, then `score_pool`. Returns the plan as stage 1 ends."""
    if not plan.scoring_chunks:
        return plan
    model = ctx.steps.load_model(staging / files.DETECTOR_FILE)
    for index in range(plan.scoring_chunks):
        ctx.progress("scoring", index / plan.scoring_chunks)
        score_chunk(staging, index, ctx, model)
    return score_pool(staging, ctx)


def _pool_ready(staging: Path, plan: RoundPlan, ctx: RoundContext, clock: StageClock,
                before: Mapping[str, float]) -> RoundPlan:
    """The end of stage 1, once the pool file is written: the strategy's one-off work for its record jobs;
    the plan saved with the stage's seconds (`before`, those `clock` did not see, added)."""
    if plan.lut_records:
        clock("caching", 0.0)
        ctx.steps.strategy(plan.strategy, ctx.config).prepare(staging)  # once here: record jobs only load it
    seconds = merge_seconds(before, clock.seconds())
    plan = replace(plan, metrics=dict(plan.metrics, stage_seconds=seconds, prepared_at=time.time()))
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
def finish(staging: Path, store: ModelStore, ctx: RoundContext) -> str:
    """Rank, write predictions, ranking and metrics, publish. Returns the published version; Label Studio
    learns of it through `announce`."""
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
        # the project's unlabeled tasks; n_ranked of them were ranked (fewer under a candidate subset)
        n_unlabeled=int(plan.metrics.get("candidates", {}).get("unlabeled", n)),
        n_ranked=n,
        lut_records=len(records),
        skipped=plan.skipped,
    )
    metrics["stage_seconds"] = merge_seconds(plan.metrics.get("stage_seconds", {}), between, clock.seconds())
    metrics["duration_s"] = round(time.time() - float(plan.metrics.get("started_at", clock.started)), 3)
    files.save_metrics(staging, metrics)
    store.publish(plan.project, staging, plan.version)
    store.release(plan.project, plan.version)
    log.info("project=%s version=%s published map=%s n_labeled=%d n_predictions=%d", plan.project,
             plan.version, metrics.get("map"), len(plan.labeled_tasks), len(predictions))
    return plan.version


# --- telling Label Studio ---
def announce(project: int, version: str, client: StudioAdmin, store: ModelStore, *, keep_previous: int,
             progress: Progress | None = None) -> dict[str, Any]:
    """Push the published `version`'s predictions, switch Label Studio's sampling to it, delete the
    predictions of every version but it and the `keep_previous` published before it. Idempotent: each step
    done is recorded (`ModelStore.save_announced`, beside the immutable version) and skipped by a re-run, so
    re-running after a failure or a killed worker completes it. Sampling is switched and old predictions
    deleted only while `version` is the served one. Returns what is done. Raises StoreError when `version`
    is not published."""
    report = progress or (lambda stage, fraction: None)
    version_dir = store.version_dir(project, version)
    done = store.load_announced(project, version)
    if not done.get("predictions"):
        report("pushing", 0.0)
        predictions = list(files.load_predictions(version_dir).values())
        if predictions:
            client.import_predictions(project, predictions)
        done = {**done, "predictions": True, "time": time.time()}
        store.save_announced(project, version, done)
    if not done.get("sampling") and store.current_version(project) == version:
        report("pushing", 0.5)
        client.serve_in_ranked_order(project, version)
        done = {**done, "sampling": True, "time": time.time()}
        store.save_announced(project, version, done)
    if done.get("sampling") and not done.get("pruned") and store.current_version(project) == version:
        published = store.list_versions(project)
        kept = published[max(0, published.index(version) - keep_previous): published.index(version) + 1]
        client.delete_predictions(project, kept)
        done = {**done, "pruned": True, "time": time.time()}
        store.save_announced(project, version, done)
    log.info("project=%s version=%s announced %s", project, version,
             ",".join(k for k in ("predictions", "sampling", "pruned") if done.get(k)))
    return done


def announced(store: ModelStore, project: int, version: str) -> bool:
    """Whether Label Studio was told of the published `version` (predictions pushed, sampling switched)."""
    store.version_dir(project, version)  # raises StoreError when not published
    done = store.load_announced(project, version)
    return bool(done.get("predictions") and done.get("sampling"))


def abandon(store: ModelStore, project: int, version: str, reason: str) -> bool:
    """A round found dead: record why in the project's last error and drop its staging directory and its
    reservation. Returns True when the round had published `version` as the served one but died before
    telling Label Studio (the caller has `announce` re-run)."""
    if version in store.list_versions(project):
        store.release(project, version)
        pending = store.current_version(project) == version and not announced(store, project, version)
        if pending:
            store.record_error(
                project, f"round {version} was published but its worker died before Label Studio was told "
                f"({reason}); announcing it again", stage="round")
        return pending
    store.abandon(project, version)
    store.record_error(project, f"round {version} abandoned: {reason}", stage="round")
    return False


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
    client: StudioAdmin,
    store: ModelStore,
    config: Config,
    steps: RoundSteps,
    progress: Progress | None = None,
) -> str:
    """Every stage in this process (tests, a single worker), then `announce`; a failure before publishing
    discards the staging directory, records the error in the store and re-raises."""
    ctx = RoundContext(config, steps, progress or (lambda stage, fraction: None))
    version = store.reserve_version(project)
    staging = store.begin(project, version)
    try:
        plan = score_here(staging, prepare(project, version, staging, client, store, ctx), ctx)
        for index in range(plan.lut_records):
            ctx.progress("lookup_table", index / plan.lut_records)
            lut_record(staging, index, ctx)
        for index in propose(staging, ctx):
            lut_record(staging, index, ctx)
        published = finish(staging, store, ctx)
    except Exception as exc:
        store.abandon(project, version)
        store.record_error(project, f"{type(exc).__name__}: {exc}", stage="round")
        raise
    try:
        announce(project, published, client, store, keep_previous=ctx.config.keep_prediction_versions,
                 progress=ctx.progress)
    except Exception as exc:
        store.record_error(project, f"telling Label Studio of {published}: {type(exc).__name__}: {exc}",
                           stage="round")
        raise
    return published
