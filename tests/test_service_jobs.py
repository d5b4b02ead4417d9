"""The rq jobs of a round, run by a real rq worker (in process) against Redis db 7, with the fake Label Studio
and the toy steps of service_fixtures installed as the worker's context."""

from __future__ import annotations

import base64
import contextlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis import Redis
from rq import SimpleWorker
from rq.job import Job, JobStatus
from service_fixtures import LABEL_CONFIG, FakeAnnotation, FakeStudio, box, studio_with, toy_config, toy_steps

from magral_core.service import context, stages
from magral_core.service import staging as files
from magral_core.service.context import WorkerContext
from magral_core.service.queue import Decision, RoundQueue, Stage, lut_job_id, score_job_id, stage_job_id
from magral_core.service.steps import RoundSteps
from magral_core.service.store import ModelStore

pytest_plugins = ["service_fixtures"]

SECRETS = {"label_studio_api_key": "ls-key-0123456789abcdef", "basic_auth_pass": "s3cret-pass-xyz"}


@pytest.fixture
def uninstall() -> Iterator[None]:
    yield
    context.install(None)


def setup_round(
    tmp_path: Path, redis_db: Redis, *, steps: Any = toy_steps, unlabeled: Sequence[int] = (4, 5, 6, 7),
    **changes: Any
) -> tuple[RoundQueue, ModelStore, FakeStudio]:
    """A project with 3 labeled and (by default) 4 unlabeled tasks; the worker context of this process uses
    them."""
    studio = studio_with(tmp_path, labeled=[1, 2, 3], unlabeled=unlabeled)
    config = toy_config(tmp_path / "home", **{**SECRETS, **changes})
    context.install(
        WorkerContext(config, client_factory=lambda config, store, project: studio, steps_factory=steps)
    )
    return RoundQueue(redis_db), context.store_for(config), studio


def work(queue: RoundQueue, max_jobs: int | None = None) -> None:
    SimpleWorker([queue.queue], connection=queue.connection).work(burst=True, max_jobs=max_jobs)


def redis_contents(redis_db: Redis) -> bytes:
    """Every value in the database (hash fields, strings, lists, sets), rq's compressed job data expanded."""
    out: list[bytes] = []
    for key in redis_db.scan_iter():
        kind = redis_db.type(key)
        values: list[Any] = []
        if kind == b"hash":
            values = [v for pair in redis_db.hgetall(key).items() for v in pair]
        elif kind == b"string":
            values = [redis_db.get(key)]
        elif kind == b"list":
            values = list(redis_db.lrange(key, 0, -1))
        elif kind == b"set":
            values = list(redis_db.smembers(key))
        elif kind == b"zset":
            values = list(redis_db.zrange(key, 0, -1))
        for value in values:
            raw = value if isinstance(value, bytes) else str(value).encode()
            out.append(raw)
            with contextlib.suppress(zlib.error):
                out.append(zlib.decompress(raw))
    return b"\n".join(out)


pytestmark = pytest.mark.usefixtures("uninstall")


def test_a_round_runs_as_a_chain_with_fanned_out_lut_records(tmp_path: Path, redis_db: Redis) -> None:
    # 6 records: 3 random ones fanned out as jobs, then (after the policy's first stage) 3 near the policy
    queue, store, studio = setup_round(tmp_path, redis_db, min_labeled_for_magral=1, lut_records=6, budget=2)
    assert queue.annotations_changed(1, 1, min_new=1) is Decision.ENQUEUED
    work(queue)
    assert store.current_version(1) == "magral-1-v0001"
    metrics = store.load_metrics(1, "magral-1-v0001")
    assert metrics["strategy"] == "magral" and metrics["lut_records"] == 6
    records = [Job.fetch(lut_job_id(1, index), connection=redis_db) for index in range(6)]
    assert [(job.get_status(), job.args[2]) for job in records] == [(JobStatus.FINISHED, i) for i in range(6)]
    propose = Job.fetch(stage_job_id(1, Stage.PROPOSE), connection=redis_db)
    assert propose.get_status() == JobStatus.FINISHED
    assert all(job.ended_at <= propose.started_at for job in records[:3])
    assert all(job.started_at >= propose.ended_at for job in records[3:])
    finish = Job.fetch(stage_job_id(1, Stage.FINISH), connection=redis_db)
    assert finish.get_status() == JobStatus.FINISHED and finish.meta["progress"]["stage"] == "pushing"
    assert sorted(p["task"] for p in studio.imported) == [4, 5, 6, 7]
    assert queue.running(1) is None and queue.queue.count == 0


def test_no_secret_travels_through_redis(tmp_path: Path, redis_db: Redis) -> None:
    queue, store, studio = setup_round(
        tmp_path, redis_db, min_labeled_for_magral=1, lut_records=4, basic_auth_user="ls"
    )
    queue.start_training(1)
    queue.enqueue_webhook_auth(1, "http://backend:9090/")
    work(queue)
    studio.add_task(8)
    queue.enqueue_scoring(1, [8])
    work(queue)
    assert store.current_version(1) is not None and studio.headers and studio.imported[-1]["task"] == 8
    contents = redis_contents(redis_db)
    assert b"magral_core.service.jobs.lut_record" in contents  # the check reads job data at all
    for secret in SECRETS.values():
        assert secret.encode() not in contents


def test_jobs_need_an_installed_worker_context(tmp_path: Path, redis_db: Redis) -> None:
    queue, store, _ = setup_round(tmp_path, redis_db)
    context.install(None)
    queue.start_training(1)
    work(queue)
    failed = Job.fetch("round-1", connection=redis_db)
    assert failed.get_status() == JobStatus.FAILED
    assert "worker context" in (failed.latest_result().exc_string or "")  # type: ignore[union-attr]
    assert store.current_version(1) is None


def test_events_during_a_round_run_exactly_one_follow_up(tmp_path: Path, redis_db: Redis) -> None:
    decisions: set[Decision] = set()

    def steps_firing_events() -> RoundSteps:
        """Toy steps whose first training receives 20 webhooks, as if annotators kept going."""
        steps = toy_steps()

        def train(dataset: Any, previous: Any, config: Any, progress: Any, val: Any) -> Any:
            if not decisions:
                decisions.update(queue.annotations_changed(1, 1, min_new=1) for _ in range(20))
            return steps.train(dataset, previous, config, progress, val)

        return replace(steps, train=train)

    queue, store, _ = setup_round(tmp_path, redis_db, steps=steps_firing_events)
    queue.annotations_changed(1, 1, min_new=1)
    work(queue)  # the burst worker runs the round, then the follow-up, then stops
    assert decisions == {Decision.DEFERRED}
    assert store.list_versions(1) == ["magral-1-v0001", "magral-1-v0002"]
    assert queue.queue.count == 0 and queue.pending_annotations(1) == 0


def test_a_failing_round_records_its_error_and_frees_the_project(tmp_path: Path, redis_db: Redis) -> None:
    queue, store, studio = setup_round(tmp_path, redis_db)
    studio.label_config = "<View><Image name='i' value='$image'/></View>"
    queue.start_training(1)
    work(queue)
    error = store.last_error(1)
    assert error is not None and "RectangleLabels" in error["message"]
    assert store.current_version(1) is None and queue.running(1) is None
    assert not list((store.project_dir(1) / "staging").iterdir())
    failed = Job.fetch("round-1-prepare", connection=redis_db)
    assert failed.get_status() == JobStatus.FAILED  # rq recorded it too
    studio.label_config = LABEL_CONFIG
    assert queue.start_training(1) is Decision.ENQUEUED
    work(queue)
    assert store.current_version(1) is not None and store.last_error(1) is None


def test_score_tasks_pre_annotates_new_tasks_with_the_served_version(tmp_path: Path, redis_db: Redis) -> None:
    queue, _, studio = setup_round(tmp_path, redis_db)
    queue.start_training(1)
    work(queue)
    studio.imported.clear()
    studio.add_task(8)
    studio.add_task(9, [FakeAnnotation(900, (box(1, 1, 5, 5, "RBC"),))])  # labeled meanwhile: not scored
    queue.enqueue_scoring(1, [4, 8, 9])  # 4 is already scored by the round
    work(queue)
    assert [(p["task"], p["score"], p["model_version"]) for p in studio.imported] == [
        (8, 1.0, "magral-1-v0001")
    ]
    assert studio.imported[0]["result"][0]["value"]["rectanglelabels"] == ["RBC"]


def test_secure_webhook_adds_basic_auth_once(tmp_path: Path, redis_db: Redis) -> None:
    queue, _, studio = setup_round(tmp_path, redis_db, basic_auth_user="ls")
    assert queue.enqueue_webhook_auth(1, "http://backend:9090/")
    work(queue)
    token = base64.b64encode(f"ls:{SECRETS['basic_auth_pass']}".encode()).decode()
    assert studio.headers == [(1, "http://backend:9090/", {"Authorization": f"Basic {token}"})]
    assert not queue.enqueue_webhook_auth(1, "http://backend:9090/")


# --- the pool scored by chunk jobs ---
POOL = (12, 4, 9, 5, 11)  # 3 chunks of 2, 2 and 1 images, not in id order


def pool_arrays(store: ModelStore, version: str) -> dict[str, Any]:
    return files.load_pool(store.version_dir(1, version) / files.POOL_FILE)


def test_a_pool_larger_than_a_chunk_is_scored_by_chunk_jobs_merged_in_pool_order(
    tmp_path: Path, redis_db: Redis
) -> None:
    queue, store, studio = setup_round(tmp_path, redis_db, unlabeled=POOL, scoring_chunk=2, batch_size=2,
                                       min_labeled_for_magral=1, lut_records=4)
    queue.start_training(1)
    work(queue)
    version = store.current_version(1)
    assert version is not None
    chunks = [Job.fetch(score_job_id(1, i), connection=redis_db) for i in range(3)]
    assert [(job.get_status(), job.args[2]) for job in chunks] == [(JobStatus.FINISHED, i) for i in range(3)]
    fan_in = Job.fetch(stage_job_id(1, Stage.POOL), connection=redis_db)
    assert fan_in.get_status() == JobStatus.FINISHED
    assert all(job.ended_at <= fan_in.started_at for job in chunks)
    records = [Job.fetch(lut_job_id(1, i), connection=redis_db) for i in range(2)]
    assert all(job.started_at >= fan_in.ended_at for job in records)  # the records come after the merge
    # the toy detector embeds each image as (task id, width): the merged pool is in the plan's pool order,
    # though the chunk jobs ran last chunk first
    assert [c.started_at for c in chunks] == sorted((c.started_at for c in chunks), reverse=True)
    plan = files.RoundPlan.load(store.version_dir(1, version))
    assert plan.scoring_chunks == 3 and [t.task for t in plan.pool] == list(POOL)
    fanned = pool_arrays(store, version)
    assert fanned["embeddings"][:, 0].tolist() == list(POOL)
    assert not (store.version_dir(1, version) / files.SCORES_DIR).exists()
    assert sorted(p["task"] for p in studio.imported) == sorted(POOL)
    assert set(store.load_metrics(1, version)["stage_seconds"]) >= {"training", "scoring", "lookup_table"}

    # the same round in one process gives the same pool arrays, in the same order
    other = ModelStore(tmp_path / "in-process")
    config = context.current().config
    in_process = stages.run_round(1, client=studio_with(tmp_path / "b", [1, 2, 3], POOL), store=other,
                                  config=config, steps=toy_steps())
    inline = pool_arrays(other, in_process)
    for key in ("embeddings", "labeled_embeddings"):
        assert np.array_equal(fanned[key], inline[key])
    for a, b in zip(fanned["detections"], inline["detections"], strict=True):
        assert np.array_equal(a.boxes_xyxy, b.boxes_xyxy) and np.array_equal(a.scores, b.scores)
        assert np.array_equal(a.labels, b.labels)


def test_a_pool_that_fits_in_one_chunk_is_scored_in_the_prepare_job(tmp_path: Path, redis_db: Redis) -> None:
    queue, store, _ = setup_round(tmp_path, redis_db, unlabeled=POOL, scoring_chunk=5)
    queue.start_training(1)
    work(queue)
    version = store.current_version(1)
    assert version is not None
    assert files.RoundPlan.load(store.version_dir(1, version)).scoring_chunks == 0
    assert queue.queue.fetch_job(score_job_id(1, 0)) is None
    assert queue.queue.fetch_job(stage_job_id(1, Stage.POOL)) is None
    assert pool_arrays(store, version)["embeddings"][:, 0].tolist() == list(POOL)


def test_scoring_progress_is_the_fraction_of_chunks_done_and_the_round_stays_alive(
    tmp_path: Path, redis_db: Redis
) -> None:
    queue, store, _ = setup_round(tmp_path, redis_db, unlabeled=POOL, scoring_chunk=2, batch_size=2)
    queue.start_training(1)
    work(queue, max_jobs=2)  # start_round, prepare_round: the chunk jobs and their fan-in are queued
    seen = []
    for _ in range(3):
        running = queue.running(1)
        assert running is not None and running["job_id"] == stage_job_id(1, Stage.POOL)
        progress = running["progress"]["progress"]
        assert progress["stage"] == "scoring" and progress["chunks"] == 3
        seen.append(progress["fraction"])
        # while chunk jobs wait for a worker the round is alive, even with its lease expired
        redis_db.delete("magral:1:lease")
        assert queue.reap_project(1, min_new=1) is None
        work(queue, max_jobs=1)  # one chunk
    assert seen == [0.0, 0.333, 0.667]
    running = queue.running(1)
    assert running is not None and running["progress"]["progress"]["fraction"] == 1.0
    work(queue)
    assert store.current_version(1) is not None and queue.running(1) is None


def failing_chunk_steps(failing: list[bool]) -> Any:
    """Toy steps whose detector fails on the pool chunk holding task 9 while `failing[0]` is set."""
    steps = toy_steps()

    def extract(model: Any, dataset: Any, config: Any) -> Any:
        if failing[0] and 9 in [im.image_id for im in dataset.images] and len(dataset) <= 2:
            raise RuntimeError("the detector broke on task 9")
        return steps.extract(model, dataset, config)

    return lambda: replace(steps, extract=extract)


def test_a_failed_chunk_fails_the_round_and_keeps_what_is_served(tmp_path: Path, redis_db: Redis) -> None:
    failing = [False]
    queue, store, studio = setup_round(tmp_path, redis_db, steps=failing_chunk_steps(failing),
                                       unlabeled=POOL, scoring_chunk=2, batch_size=2)
    queue.start_training(1)
    work(queue)
    served = store.current_version(1)
    assert served == "magral-1-v0001"
    pushed, predictions = list(studio.imported), files.load_predictions(store.version_dir(1, served))
    failing[0] = True
    assert queue.start_training(1) is Decision.ENQUEUED
    work(queue)
    assert Job.fetch(score_job_id(1, 1), connection=redis_db).get_status() == JobStatus.FAILED
    assert Job.fetch(stage_job_id(1, Stage.POOL), connection=redis_db).get_status() == JobStatus.FAILED
    error = store.last_error(1)
    assert error is not None
    assert "round-1-score-1 failed" in error["message"] and "the detector broke on task 9" in error["message"]
    assert store.current_version(1) == served and store.list_versions(1) == [served]
    assert studio.imported == pushed and studio.served == [(1, served)]
    assert files.load_predictions(store.version_dir(1, served)) == predictions
    assert not list((store.project_dir(1) / "staging").iterdir())
    assert not list((store.project_dir(1) / "reserved").iterdir())
    assert queue.running(1) is None and queue.queue.count == 0
    failing[0] = False  # the project is free: the next round runs and publishes
    assert queue.start_training(1) is Decision.ENQUEUED
    work(queue)
    assert store.current_version(1) == "magral-1-v0002" and store.last_error(1) is None
