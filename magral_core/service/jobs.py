"""The rq jobs: importable module-level functions that take ids (project, staging directory of the round,
record index, task ids), never objects and never configuration; each reads its worker's context
(`service.context`) and enqueues what follows through `service.queue`.

Jobs let exceptions propagate (rq records the failure) after writing the error into the store, where
`/status` reads it. Progress goes into `job.meta["progress"]` = {"stage", "fraction", "version"} (best
effort: a Redis outage does not fail a training job). Every job of a round holds the round's lease while it
runs (a heartbeat thread renews it, `RoundQueue.renew_lease`), so a round whose worker dies is found within
seconds (see `service.queue`).

Kept as one module because rq finds every job under one dotted prefix (`queue.JOBS`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from magral_core.config import Config
from magral_core.service import context, stages, staging
from magral_core.service.context import WorkerContext
from magral_core.service.predict import TaskRef, predict_tasks
from magral_core.service.queue import RoundQueue, Stage, stage_job_id
from magral_core.service.steps import Progress
from magral_core.service.tasks import latest_annotation

log = logging.getLogger(__name__)


REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


def _coordinator(job: Job, config: Config) -> RoundQueue:
    return RoundQueue(
        job.connection, queue_name=job.origin, round_timeout=config.round_timeout,
        on_abandoned=context.recovery(context.store_for(config)),
    )


@contextmanager
def _lease(job: Job | None, config: Config, project: int, version: str) -> Iterator[None]:
    """Renew the round's lease every third of its life while the body runs (a thread: the body may hold the
    GIL-releasing training loop for minutes). Redis errors are logged, never raised."""
    if job is None:
        yield
        return
    coordinator = _coordinator(job, config)
    stop = threading.Event()

    def renew() -> None:
        try:
            coordinator.renew_lease(project, version)
        except REDIS_DOWN as exc:
            log.warning("project=%s version=%s lease not renewed: %s", project, version, exc)

    def beat() -> None:
        while not stop.wait(coordinator.lease_s / 3):
            renew()

    renew()
    thread = threading.Thread(target=beat, name=f"lease-{project}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _reporter(job: Job | None, version: str) -> Progress:
    def report(stage: str, fraction: float) -> None:
        if job is None:
            return
        job.meta["progress"] = {"stage": stage, "fraction": round(float(fraction), 3), "version": version}
        try:
            job.save_meta()
        except REDIS_DOWN as exc:  # progress is for /status only: the round goes on
            log.warning("version=%s progress not saved: %s", version, exc)

    return report


def _current_job() -> Job:
    job = get_current_job()
    if job is None:
        raise RuntimeError("this function runs as an rq job (no current job found)")
    return job


def _fail(
    project: int, exc: BaseException, *, ctx: WorkerContext, staging_dir: Path | None, job: Job
) -> None:
    """Record a failed round where /status reads it, drop its staging directory, let the next round start."""
    store = ctx.store
    store.record_error(project, f"{type(exc).__name__}: {exc}", stage="round")
    version = _version_of(str(staging_dir)) if staging_dir is not None else None
    if staging_dir is not None:
        store.discard(staging_dir)
        if version not in store.list_versions(project):
            store.release(project, str(version))
    log.error("project=%s round failed: %s: %s", project, type(exc).__name__, exc)
    _coordinator(job, ctx.config).end_round(project, min_new=ctx.config.min_new_annotations, version=version)


def _round_context(staging_dir: str, job: Job | None) -> tuple[WorkerContext, stages.RoundContext]:
    ctx = context.current()
    version = _version_of(staging_dir)
    return ctx, stages.RoundContext(ctx.config, ctx.steps_factory(), _reporter(job, version))


# --- the round ---
def start_round(project: int) -> str:
    """The queued job `round-<p>`: mark the round active (consuming the events it covers), reserve its
    version and hand the work to `prepare_round` (a separate job, so that a follow-up can be queued under
    `round-<p>` again while the round runs). Returns the version being built."""
    job = _current_job()
    ctx = context.current()
    store = ctx.store
    coordinator = _coordinator(job, ctx.config)
    _announce_served(project, ctx)
    version = store.reserve_version(project)
    state = coordinator.begin_round(project, job_id=job.id, version=version)
    log.info(
        "project=%s version=%s round started new_annotations=%d forced=%s",
        project,
        version,
        state.new_annotations,
        state.forced,
    )
    staging_dir: Path | None = None
    try:
        staging_dir = store.begin(project, version)
        coordinator.enqueue_stage(project, Stage.PREPARE, str(staging_dir))
        coordinator.touch(project, job_id=stage_job_id(project, Stage.PREPARE), version=version)
        return version
    except Exception as exc:
        _fail(project, exc, ctx=ctx, staging_dir=staging_dir, job=job)
        raise


def prepare_round(project: int, staging_dir: str) -> str:
    """Train (see `stages.prepare`); then, when the pool is larger than one scoring chunk, fan out the
    scoring jobs and the `pool_round` fan-in that depends on them; otherwise (the pool scored in this job)
    fan out the look-up-table record jobs and their fan-in. Returns the version being built."""
    job = _current_job()
    ctx, round_ctx = _round_context(staging_dir, job)
    try:
        with _lease(job, ctx.config, project, _version_of(staging_dir)):
            plan = stages.prepare(project, _version_of(staging_dir), Path(staging_dir), ctx.client(project),
                                  ctx.store, round_ctx)
        coordinator = _coordinator(job, ctx.config)
        if plan.scoring_chunks:
            chunks = coordinator.enqueue_chunks(project, staging_dir, range(plan.scoring_chunks))
            _then(coordinator, project, staging_dir, chunks, Stage.POOL, "scoring", "chunks")
        else:
            _fan_out(job, ctx.config, project, staging_dir, range(plan.lut_records), _after_pool(plan))
        return plan.version
    except Exception as exc:
        _fail(project, exc, ctx=ctx, staging_dir=Path(staging_dir), job=job)
        raise


def score_chunk(project: int, staging_dir: str, index: int) -> str:
    """One scoring chunk of a round's pool (independent of the others; see `stages.score_chunk`), its
    progress counted in the `pool_round` job's meta. Returns the chunk file's path."""
    job = get_current_job()
    ctx, round_ctx = _round_context(staging_dir, job)
    version = _version_of(staging_dir)
    round_ctx.progress("scoring", 0.0)
    with _lease(job, ctx.config, project, version):
        path = stages.score_chunk(Path(staging_dir), index, round_ctx)
    if job is not None:
        try:
            _coordinator(job, ctx.config).chunk_scored(project, version)
        except REDIS_DOWN as exc:  # progress is for /status only: the chunk is written
            log.warning("project=%s version=%s chunk %d progress not saved: %s", project, version, index, exc)
    return str(path)


def pool_round(project: int, staging_dir: str) -> str:
    """Fan-in job of the scoring chunks: a chunk whose job failed fails the round (its error named); else
    merge them into the pool file and finish stage 1 (see `stages.score_pool`), then fan out the record
    jobs and their fan-in. Returns the version being built."""
    job = _current_job()
    ctx, round_ctx = _round_context(staging_dir, job)
    try:
        failed = _failed_dependency(job)
        if failed is not None:
            raise RuntimeError(failed)
        with _lease(job, ctx.config, project, _version_of(staging_dir)):
            plan = stages.score_pool(Path(staging_dir), round_ctx)
        _fan_out(job, ctx.config, project, staging_dir, range(plan.lut_records), _after_pool(plan))
        return plan.version
    except Exception as exc:
        _fail(project, exc, ctx=ctx, staging_dir=Path(staging_dir), job=job)
        raise


def _after_pool(plan: staging.RoundPlan) -> Stage:
    return Stage.PROPOSE if plan.lut_records else Stage.FINISH


def _failed_dependency(job: Job) -> str | None:
    """What went wrong with the first of `job`'s dependencies that did not finish (its id and the last line
    of its error), or None when none failed. A dependency gone from Redis finished long ago (its result
    expired): what it wrote is checked by the stage."""
    for dependency_id in job.dependency_ids:
        try:
            dependency = Job.fetch(dependency_id, connection=job.connection)
        except NoSuchJobError:
            continue
        status = dependency.get_status(refresh=True)
        if status != JobStatus.FINISHED:
            result = dependency.latest_result()
            error = (result.exc_string or "").strip().splitlines() if result is not None else []
            state = getattr(status, "value", status)
            return f"job {dependency_id} {state}: {error[-1] if error else 'no error recorded'}"
    return None


def propose_round(project: int, staging_dir: str) -> str:
    """Fan-in job of the first records: the strategy's `propose` (see `stages.propose`), then fan out the
    records it asks for and the fan-in `finish_round` job that depends on them. Returns the version."""
    job = _current_job()
    ctx, round_ctx = _round_context(staging_dir, job)
    try:
        round_ctx.progress("policy", 0.0)
        with _lease(job, ctx.config, project, _version_of(staging_dir)):
            more = stages.propose(Path(staging_dir), round_ctx)
        _fan_out(job, ctx.config, project, staging_dir, more, Stage.FINISH)
        return _version_of(staging_dir)
    except Exception as exc:
        _fail(project, exc, ctx=ctx, staging_dir=Path(staging_dir), job=job)
        raise


def _fan_out(job: Job, config: Config, project: int, staging_dir: str, indices: Sequence[int],
             then: Stage) -> None:
    """One `lut_record` job per index, and stage `then` once they have all ended."""
    coordinator = _coordinator(job, config)
    records = coordinator.enqueue_records(project, staging_dir, indices)
    _then(coordinator, project, staging_dir, records, then, "lookup_table", "records")


def _then(coordinator: RoundQueue, project: int, staging_dir: str, jobs: Sequence[Job], then: Stage,
          stage: str, count: str) -> None:
    """Stage `then` once `jobs` have all ended, shown meanwhile as `stage` with `count` = how many."""
    version = _version_of(staging_dir)
    # what /status shows while the fanned-out jobs run
    progress = {"stage": stage, "fraction": 0.0, "version": version, count: len(jobs)}
    coordinator.enqueue_stage(project, then, staging_dir, depends_on=jobs, meta={"progress": progress})
    coordinator.touch(project, job_id=stage_job_id(project, then), version=version)


def lut_record(project: int, staging_dir: str, index: int) -> str:
    """One look-up-table record of a round (independent of the others). Returns the record's path."""
    job = get_current_job()
    ctx, round_ctx = _round_context(staging_dir, job)
    round_ctx.progress("lookup_table", 0.0)
    with _lease(job, ctx.config, project, _version_of(staging_dir)):
        return str(stages.lut_record(Path(staging_dir), index, round_ctx))


def finish_round(project: int, staging_dir: str) -> str:
    """Fan-in job: rank and publish (see `stages.finish`), then tell Label Studio (`stages.announce`; when
    that fails, the version still serves `/predict` and the next round or `announce_version` completes it).
    Returns the published version."""
    job = _current_job()
    ctx, round_ctx = _round_context(staging_dir, job)
    version = _version_of(staging_dir)
    try:
        with _lease(job, ctx.config, project, version):
            stages.finish(Path(staging_dir), ctx.store, round_ctx)
            stages.announce(project, version, ctx.client(project), ctx.store,
                            keep_previous=ctx.config.keep_prediction_versions, progress=round_ctx.progress)
    except Exception as exc:
        _fail(project, exc, ctx=ctx, staging_dir=Path(staging_dir), job=job)
        raise
    _coordinator(job, ctx.config).end_round(project, min_new=ctx.config.min_new_annotations, version=version)
    return version


def announce_version(project: int, version: str) -> dict[str, bool]:
    """Complete telling Label Studio of the published `version` (idempotent, see `stages.announce`)."""
    ctx = context.current()
    done = stages.announce(project, version, ctx.client(project), ctx.store,
                           keep_previous=ctx.config.keep_prediction_versions)
    return {k: bool(done.get(k)) for k in ("predictions", "sampling", "pruned")}


def _announce_served(project: int, ctx: WorkerContext) -> None:
    """Before a round: the served version's announcement, if a killed or failed round left it undone (a
    failure here is logged; the round still runs and announces its own version)."""
    version = ctx.store.current_version(project)
    if version is None or stages.announced(ctx.store, project, version):
        return
    try:
        stages.announce(project, version, ctx.client(project), ctx.store,
                        keep_previous=ctx.config.keep_prediction_versions)
    except Exception as exc:
        log.warning("project=%s version=%s announce not completed: %s", project, version, exc)


def _version_of(staging_dir: str) -> str:
    """The version a staging directory builds (`<version>.<random>`, see `ModelStore.begin`)."""
    return Path(staging_dir).name.split(".", 1)[0]


# --- other jobs ---
def score_tasks(project: int, task_ids: Sequence[int]) -> int:
    """Pre-annotate newly created tasks with the served version. They are not part of that version's ranking
    yet, so they get score 1.0 (served after the ranked tasks) until the next round ranks them. Tasks whose
    image cannot be fetched are skipped with a log line. Returns the number of predictions created."""
    from magral_core.studio.label_config import parse_label_config
    from magral_core.studio.results import task_prediction

    ctx = context.current()
    config, store = ctx.config, ctx.store
    version = store.current_version(project)
    if version is None:
        log.info("project=%s no version yet: %d new tasks wait for the first round", project, len(task_ids))
        return 0
    client, steps = ctx.client(project), ctx.steps_factory()
    version_dir = store.version_dir(project, version)
    wanted = {int(t) for t in task_ids} - set(staging.load_predictions(version_dir))
    label_config = parse_label_config(str(client.get_project(project).get("label_config", "")))
    class_names = tuple(store.load_metrics(project, version)["class_names"])
    refs = [
        TaskRef(int(task.id), str(task.image))
        for task in client.list_tasks(project, image_key=label_config.image_key)
        if int(task.id) in wanted and latest_annotation(task) is None
    ]
    results = predict_tasks(
        project, refs, client=client, model=lambda: steps.load_model(version_dir / staging.DETECTOR_FILE),
        steps=steps, class_names=class_names, label_config=label_config, config=config,
    )
    predictions = [
        task_prediction(ref.task, result, 1.0, version)
        for ref, result in zip(refs, results, strict=True)
        if result is not None
    ]
    if not predictions:
        return 0
    created = int(client.import_predictions(project, predictions))
    log.info("project=%s version=%s scored new tasks=%d", project, version, created)
    return created


def secure_webhook(project: int, backend_url: str) -> int:
    """Add the backend's basic-auth header to the project's webhooks that point at `backend_url` (Label Studio
    sends none on its auto-created webhook). Returns how many webhooks were changed."""
    import base64

    ctx = context.current()
    config = ctx.config
    client = ctx.client(project)
    token = base64.b64encode(f"{config.basic_auth_user}:{config.basic_auth_pass}".encode()).decode()
    changed = int(client.add_webhook_header(project, backend_url, {"Authorization": f"Basic {token}"}))
    job = get_current_job()
    if job is not None and changed:
        _coordinator(job, config).webhook_auth_done(project)
    log.info("project=%s basic auth added to %d webhook(s) of %s", project, changed, backend_url)
    return changed
