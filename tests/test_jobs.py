"""The rq jobs of a round, run by a real rq worker (in process) against Redis db 7, with the fake Label Studio
and the toy steps of test_rounds."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import SimpleWorker
from rq.job import Job, JobStatus
from test_queueing import connect
from test_rounds import FakeAnnotation, FakeStudio, box, studio_with, toy_config, toy_steps

from magral_core import jobs, rounds
from magral_core.config import Config
from magral_core.queueing import Decision, RoundQueue, finish_job_id, lut_job_id
from magral_core.store import ModelStore

STUDIO: dict[str, Any] = {}
EVENTS: dict[str, Any] = {}


def fake_client(config: Config, store: ModelStore, project: int) -> FakeStudio:
    """client_factory of the jobs: the studio the running test installed."""
    return STUDIO["studio"]


def steps_firing_events() -> rounds.RoundSteps:
    """Toy steps whose first training receives 20 webhooks, as if annotators kept going."""
    steps = toy_steps()

    def train(dataset, previous, config, progress):
        if not EVENTS.get("fired"):
            EVENTS["fired"] = True
            queue = EVENTS["queue"]
            EVENTS["decisions"] = {
                queue.annotations_changed(1, 1, settings=EVENTS["settings"], min_new=1) for _ in range(20)
            }
        return steps.train(dataset, previous, config, progress)

    return rounds.RoundSteps(
        train, steps.extract, steps.evaluate, steps.save_model, steps.load_model, steps.lut_record, steps.rank
    )


@pytest.fixture
def redis_db(tmp_path: Path) -> Iterator[Redis]:
    conn = connect(tmp_path)
    conn.flushdb()
    STUDIO.clear()
    EVENTS.clear()
    yield conn
    conn.flushdb()


def setup_round(
    tmp_path: Path, redis_db: Redis, *, steps: str = "test_rounds:toy_steps", **changes: Any
) -> tuple[RoundQueue, dict[str, Any], ModelStore, FakeStudio]:
    studio = studio_with(tmp_path, labeled=[1, 2, 3], unlabeled=[4, 5, 6, 7])
    STUDIO["studio"] = studio
    config = toy_config(tmp_path / "home", **changes)
    settings = jobs.settings_from_config(config, client_factory="test_jobs:fake_client", steps_factory=steps)
    return RoundQueue(redis_db), settings, jobs.store_for(config), studio


def work(queue: RoundQueue) -> None:
    SimpleWorker([queue.queue], connection=queue.connection).work(burst=True)


def test_settings_round_trip_to_the_same_config(tmp_path: Path) -> None:
    config = toy_config(tmp_path, epochs=3, device="cpu")
    assert jobs.config_from_settings(jobs.settings_from_config(config, extra=1)) == config


def test_a_round_runs_as_a_chain_with_fanned_out_lut_records(tmp_path: Path, redis_db: Redis) -> None:
    # 6 records: 3 random ones fanned out as jobs, 3 near the policy left to the fan-in job
    queue, settings, store, studio = setup_round(
        tmp_path, redis_db, min_labeled_for_magral=1, lut_records=6, budget=2
    )
    assert queue.annotations_changed(1, 1, settings=settings, min_new=1) is Decision.ENQUEUED
    work(queue)
    assert store.current_version(1) == "magral-1-v0001"
    metrics = store.load_metrics(1, "magral-1-v0001")
    assert metrics["strategy"] == "magral" and metrics["lut_records"] == 3
    for index in range(3):
        assert Job.fetch(lut_job_id(1, index), connection=redis_db).get_status() == JobStatus.FINISHED
    finish = Job.fetch(finish_job_id(1), connection=redis_db)
    assert finish.get_status() == JobStatus.FINISHED and finish.meta["progress"]["stage"] == "pushing"
    assert sorted(p["task"] for p in studio.imported) == [4, 5, 6, 7]
    assert queue.running(1) is None and queue.queue.count == 0


def test_events_during_a_round_run_exactly_one_follow_up(tmp_path: Path, redis_db: Redis) -> None:
    queue, settings, store, _ = setup_round(tmp_path, redis_db, steps="test_jobs:steps_firing_events")
    EVENTS.update(queue=queue, settings=settings)
    queue.annotations_changed(1, 1, settings=settings, min_new=1)
    work(queue)  # the burst worker runs the round, then the follow-up, then stops
    assert EVENTS["decisions"] == {Decision.DEFERRED}
    assert store.list_versions(1) == ["magral-1-v0001", "magral-1-v0002"]
    assert queue.queue.count == 0 and queue.pending_annotations(1) == 0


def test_a_failing_round_records_its_error_and_frees_the_project(tmp_path: Path, redis_db: Redis) -> None:
    queue, settings, store, studio = setup_round(tmp_path, redis_db)
    studio.label_config = "<View><Image name='i' value='$image'/></View>"
    queue.start_training(1, settings=settings)
    work(queue)
    error = store.last_error(1)
    assert error is not None and "RectangleLabels" in error["message"]
    assert store.current_version(1) is None and queue.running(1) is None
    assert not list((store.project_dir(1) / "staging").iterdir())
    failed = Job.fetch("round-1-prepare", connection=redis_db)
    assert failed.get_status() == JobStatus.FAILED  # rq recorded it too
    studio.label_config = rounds_label_config()
    assert queue.start_training(1, settings=settings) is Decision.ENQUEUED
    work(queue)
    assert store.current_version(1) is not None and store.last_error(1) is None


def rounds_label_config() -> str:
    from test_rounds import LABEL_CONFIG

    return LABEL_CONFIG


def test_score_tasks_pre_annotates_new_tasks_with_the_served_version(tmp_path: Path, redis_db: Redis) -> None:
    queue, settings, _, studio = setup_round(tmp_path, redis_db)
    queue.start_training(1, settings=settings)
    work(queue)
    studio.imported.clear()
    studio.add_task(8)
    studio.add_task(9, [FakeAnnotation(900, (box(1, 1, 5, 5, "RBC"),))])  # labeled meanwhile: not scored
    queue.enqueue_scoring(1, [4, 8, 9], settings=settings)  # 4 is already scored by the round
    work(queue)
    assert [(p["task"], p["score"], p["model_version"]) for p in studio.imported] == [
        (8, 1.0, "magral-1-v0001")
    ]
    assert studio.imported[0]["result"][0]["value"]["rectanglelabels"] == ["RBC"]


def test_secure_webhook_adds_basic_auth_once(tmp_path: Path, redis_db: Redis) -> None:
    queue, settings, _, studio = setup_round(
        tmp_path, redis_db, basic_auth_user="ls", basic_auth_pass="s3cret"
    )
    assert queue.enqueue_webhook_auth(1, "http://backend:9090/", settings=settings)
    work(queue)
    token = base64.b64encode(b"ls:s3cret").decode()
    assert studio.headers == [(1, "http://backend:9090/", {"Authorization": f"Basic {token}"})]
    assert not queue.enqueue_webhook_auth(1, "http://backend:9090/", settings=settings)
