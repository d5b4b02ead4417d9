"""The rq jobs: importable module-level functions that take ids (project, staging directory of the round,
record index, task ids), never objects and never configuration.

Job arguments travel through Redis, so they carry no secret: the worker process reads its `Config` from its
own environment once, in its entry (`magral worker`), and installs it here with `install(WorkerContext(...))`
before it forks; every job reads it back with `context()`. The context also names the factories of the Label
Studio client and of the round's steps, so an embedding application or a test can swap them.

Jobs let exceptions propagate (rq records the failure) after writing the error into the store, where
`/status` reads it. Progress goes into `job.meta["progress"]` = {"stage", "fraction", "version"}.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rq import Queue, get_current_job
from rq.job import Dependency, Job

from magral_core import ranking, round_steps, rounds
from magral_core.config import Config
from magral_core.errors import UserError
from magral_core.queueing import (
    RoundQueue,
    finish_job_id,
    lut_job_id,
    prepare_job_id,
    propose_job_id,
    round_job_id,
)
from magral_core.store import ModelStore

log = logging.getLogger(__name__)


def store_for(config: Config) -> ModelStore:
    """The model store of a config: `<home>/projects`."""
    return ModelStore(config.home / "projects")


def make_client(config: Config, store: ModelStore, project: int) -> Any:
    """The Label Studio client of the config, falling back to the hostname/token `/setup` saw."""
    from magral_core.labelstudio import LabelStudioClient, parse_allowed_hosts

    seen = store.load_connection(project)
    return LabelStudioClient(
        url=config.label_studio_url or seen.get("hostname", ""),
        api_key=config.label_studio_api_key or seen.get("access_token", ""),
        cache_dir=config.home / "images",
        timeout=config.download_timeout,
        max_image_bytes=config.max_image_bytes,
        max_image_pixels=config.max_image_pixels,
        cache_bytes=config.image_cache_bytes,
        allowed_hosts=parse_allowed_hosts(config.allowed_image_hosts),
    )


# --- the worker's context ---
@dataclass(frozen=True)
class WorkerContext:
    """What the jobs of one worker process use.

    `config` is the worker's own `Config.from_env()`; `client_factory(config, store, project)` builds the
    Label Studio client (default `make_client`); `steps_factory()` gives a round's steps (default
    `round_steps.default_steps`).
    """

    config: Config
    client_factory: Callable[[Config, ModelStore, int], Any] = make_client
    steps_factory: Callable[[], rounds.RoundSteps] = round_steps.default_steps

    @property
    def store(self) -> ModelStore:
        return store_for(self.config)

    def client(self, project: int) -> Any:
        """The Label Studio client for `project` (may raise: no URL, no key)."""
        return self.client_factory(self.config, self.store, project)


_installed: WorkerContext | None = None


def install(worker_context: WorkerContext | None) -> None:
    """Make `worker_context` what this process's jobs use (None uninstalls). Called by the worker entry
    before the worker forks, so every work horse inherits it."""
    global _installed
    _installed = worker_context


def context() -> WorkerContext:
    """The installed context. Raises RuntimeError when none is (the job runs outside `magral worker`)."""
    if _installed is None:
        raise RuntimeError(
            "expected a worker context installed by the worker entry (`magral worker`, or "
            "jobs.install(WorkerContext(config)) before the worker starts), found none"
        )
    return _installed


def _coordinator(job: Job, config: Config) -> RoundQueue:
    return RoundQueue(job.connection, queue_name=job.origin, round_timeout=config.round_timeout)


def _reporter(job: Job | None, version: str) -> rounds.Progress:
    def report(stage: str, fraction: float) -> None:
        if job is None:
            return
        job.meta["progress"] = {"stage": stage, "fraction": round(float(fraction), 3), "version": version}
        job.save_meta()

    return report


def _current_job() -> Job:
    job = get_current_job()
    if job is None:
        raise RuntimeError("this function runs as an rq job (no current job found)")
    return job


def _fail(project: int, exc: BaseException, *, ctx: WorkerContext, staging: Path | None, job: Job) -> None:
    """Record a failed round where /status reads it, drop its staging directory, let the next round start."""
    store = ctx.store
    store.record_error(project, f"{type(exc).__name__}: {exc}", stage="round")
    if staging is not None:
        store.discard(staging)
    log.error("project=%s round failed: %s: %s", project, type(exc).__name__, exc)
    _coordinator(job, ctx.config).end_round(project, min_new=ctx.config.min_new_annotations)


# --- the round ---
def start_round(project: int) -> str:
    """The queued job `round-<p>`: mark the round active (consuming the events it covers), reserve its
    version and hand the work to `prepare_round` (a separate job, so that a follow-up can be queued under
    `round-<p>` again while the round runs). Returns the version being built."""
    job = _current_job()
    ctx = context()
    store = ctx.store
    coordinator = _coordinator(job, ctx.config)
    version = store.reserve_version(project)
    state = coordinator.begin_round(project, job_id=job.id, version=version)
    log.info(
        "project=%s version=%s round started new_annotations=%d forced=%s",
        project,
        version,
        state.new_annotations,
        state.forced,
    )
    staging: Path | None = None
    try:
        staging = store.begin(project, version)
        _drop_stale(job, prepare_job_id(project))
        Queue(job.origin, connection=job.connection).enqueue_call(
            "magral_core.jobs.prepare_round",
            args=(project, str(staging)),
            job_id=prepare_job_id(project),
            timeout=ctx.config.round_timeout,
            result_ttl=24 * 3600,
            at_front=True,
        )
        coordinator.touch(project, job_id=prepare_job_id(project), version=version)
        return version
    except Exception as exc:
        _fail(project, exc, ctx=ctx, staging=staging, job=job)
        raise


def prepare_round(project: int, staging: str) -> str:
    """Train and score (see `rounds.prepare`), then fan out the look-up-table record jobs and the fan-in
    `finish_round` job that depends on them. Returns the version being built."""
    job = _current_job()
    ctx = context()
    config = ctx.config
    coordinator = _coordinator(job, config)
    version = _version_of(staging)
    try:
        plan = rounds.prepare(
            project,
            version,
            Path(staging),
            client=ctx.client(project),
            store=ctx.store,
            config=config,
            steps=ctx.steps_factory(),
            progress=_reporter(job, version),
        )
        next_stage = "magral_core.jobs.propose_round" if plan.lut_records else "magral_core.jobs.finish_round"
        next_id = propose_job_id(project) if plan.lut_records else finish_job_id(project)
        _fan_out(job, project, staging, version, range(plan.lut_records), next_stage, next_id)
        coordinator.touch(project, job_id=next_id, version=version)
        return version
    except Exception as exc:
        _fail(project, exc, ctx=ctx, staging=Path(staging), job=job)
        raise


def propose_round(project: int, staging: str) -> str:
    """Fan-in job of the first records: MAGRAL's first stage (see `rounds.propose`), then fan out the
    near-policy record jobs and the fan-in `finish_round` job that depends on them. Returns the version."""
    job = _current_job()
    ctx = context()
    version = _version_of(staging)
    try:
        _reporter(job, version)("policy", 0.0)
        more = rounds.propose(Path(staging), config=ctx.config, steps=ctx.steps_factory())
        then = "magral_core.jobs.finish_round"
        _fan_out(job, project, staging, version, more, then, finish_job_id(project))
        _coordinator(job, ctx.config).touch(project, job_id=finish_job_id(project), version=version)
        return version
    except Exception as exc:
        _fail(project, exc, ctx=ctx, staging=Path(staging), job=job)
        raise


def _fan_out(job: Job, project: int, staging: str, version: str, indices: Sequence[int], then: str,
             then_id: str) -> None:
    """Enqueue one `lut_record` job per index and the job `then(project, staging)` (id `then_id`) that
    runs once they have all ended, failed ones included (a missing record is computed by the fan-in)."""
    config = context().config
    queue = Queue(job.origin, connection=job.connection)
    records = []
    for index in indices:
        _drop_stale(job, lut_job_id(project, index))
        records.append(
            queue.enqueue_call(
                "magral_core.jobs.lut_record",
                args=(project, staging, index),
                job_id=lut_job_id(project, index),
                timeout=config.round_timeout,
                result_ttl=3600,
                at_front=True,
            )
        )
    _drop_stale(job, then_id)
    queue.enqueue_call(
        then,
        args=(project, staging),
        job_id=then_id,
        timeout=config.round_timeout,
        result_ttl=24 * 3600,
        depends_on=Dependency(jobs=records, allow_failure=True, enqueue_at_front=True) if records else None,
        at_front=True,
        # what /status shows while the record jobs run
        meta={"progress": {"stage": "lookup_table", "fraction": 0.0, "version": version,
                           "records": len(records)}},
    )


def lut_record(project: int, staging: str, index: int) -> str:
    """One look-up-table record of a round (independent of the others). Returns the record's path."""
    ctx = context()
    _reporter(get_current_job(), _version_of(staging))("lookup_table", 0.0)
    return str(rounds.lut_record(Path(staging), index, config=ctx.config, steps=ctx.steps_factory()))


def finish_round(project: int, staging: str) -> str:
    """Fan-in job: rank, push predictions, publish (see `rounds.finish`). Returns the published version."""
    job = _current_job()
    ctx = context()
    try:
        version = rounds.finish(
            Path(staging),
            client=ctx.client(project),
            store=ctx.store,
            config=ctx.config,
            steps=ctx.steps_factory(),
            progress=_reporter(job, _version_of(staging)),
        )
    except Exception as exc:
        _fail(project, exc, ctx=ctx, staging=Path(staging), job=job)
        raise
    _coordinator(job, ctx.config).end_round(project, min_new=ctx.config.min_new_annotations)
    return version


def _version_of(staging: str) -> str:
    """The version a staging directory builds (`<version>.<random>`, see `ModelStore.begin`)."""
    return Path(staging).name.split(".", 1)[0]


def _drop_stale(job: Job, job_id: str) -> None:
    """Remove a finished job of an earlier round that holds the id this round needs."""
    if Job.exists(job_id, connection=job.connection):
        Job.fetch(job_id, connection=job.connection).delete()


# --- other jobs ---
def score_tasks(project: int, task_ids: Sequence[int]) -> int:
    """Pre-annotate newly created tasks with the served version. They are not part of that version's ranking
    yet, so they get score 1.0 (served after the ranked tasks) until the next round ranks them. Tasks whose
    image cannot be fetched are skipped with a log line. Returns the number of predictions created."""
    from magral_core.images import image_size
    from magral_core.label_config import parse_label_config
    from magral_core.structures import AnnotatedImage, DetectionDataset

    ctx = context()
    config, store = ctx.config, ctx.store
    version = store.current_version(project)
    if version is None:
        log.info("project=%s no version yet: %d new tasks wait for the first round", project, len(task_ids))
        return 0
    client, steps = ctx.client(project), ctx.steps_factory()
    version_dir = store.version_dir(project, version)
    wanted = {int(t) for t in task_ids} - set(rounds.load_predictions(version_dir))
    label_config = parse_label_config(str(client.get_project(project).get("label_config", "")))
    class_names = tuple(store.load_metrics(project, version)["class_names"])
    images = []
    for task in client.list_tasks(project, image_key=label_config.image_key):
        if int(task.id) not in wanted or rounds.latest_annotation(task) is not None:
            continue
        try:
            path = client.fetch_image(str(task.image), task_id=int(task.id))
            width, height = image_size(path)
        except UserError as exc:
            log.warning("project=%s task=%s not scored: %s", project, task.id, exc)
            continue
        images.append(AnnotatedImage(int(task.id), str(path), width, height))
    if not images:
        return 0
    model = steps.load_model(version_dir / rounds.DETECTOR_FILE)
    detections, _ = steps.extract(model, DetectionDataset(Path("/"), class_names, tuple(images)), config)
    predictions = [
        ranking.task_prediction(
            image.image_id,
            ranking.detections_to_results(
                det,
                width=image.width,
                height=image.height,
                class_names=class_names,
                config=label_config,
                threshold=config.prediction_threshold,
            ),
            1.0,
            version,
        )
        for image, det in zip(images, detections, strict=True)
    ]
    created = int(client.import_predictions(project, predictions))
    log.info("project=%s version=%s scored new tasks=%d", project, version, created)
    return created


def secure_webhook(project: int, backend_url: str) -> int:
    """Add the backend's basic-auth header to the project's webhooks that point at `backend_url` (Label Studio
    sends none on its auto-created webhook). Returns how many webhooks were changed."""
    import base64

    ctx = context()
    config = ctx.config
    client = ctx.client(project)
    token = base64.b64encode(f"{config.basic_auth_user}:{config.basic_auth_pass}".encode()).decode()
    changed = int(client.add_webhook_header(project, backend_url, {"Authorization": f"Basic {token}"}))
    job = get_current_job()
    if job is not None and changed:
        _coordinator(job, config).webhook_auth_done(project)
    log.info("project=%s basic auth added to %d webhook(s) of %s", project, changed, backend_url)
    return changed


__all__ = [
    "WorkerContext",
    "context",
    "finish_round",
    "install",
    "lut_record",
    "make_client",
    "prepare_round",
    "round_job_id",
    "score_tasks",
    "secure_webhook",
    "start_round",
    "store_for",
]
