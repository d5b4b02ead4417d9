"""A real Label Studio 1.23.2 for the end-to-end tests: installed and started by scripts/labelstudio.sh (its
own venv under .cache/, a migrated data-dir template), one server per test session on 127.0.0.1, stopped
(its whole process group) at the end. Every wait has a deadline, so a broken server fails the tests instead
of hanging them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "labelstudio.sh"
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"  # the script's default, baked into its template
INSTALL_TIMEOUT = 1500  # s: pip install (~2 min) + first migrations (1-3 min) on a busy 2-core machine
START_TIMEOUT = 240  # s: ~15 s from the template, more when the cores are busy
HTTP_TIMEOUT = 30  # s, every request of the fixtures and tests
BCCD_CLASSES = ("RBC", "WBC", "Platelets")
BCCD_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image">'
    + "".join(f'<Label value="{name}"/>' for name in BCCD_CLASSES)
    + "</RectangleLabels></View>"
)
N_IMAGES = 20


@dataclass(frozen=True)
class StudioServer:
    """A running Label Studio: base URL, the admin's legacy token, the server log."""

    url: str
    token: str
    log: Path

    def api(self, method: str, path: str, **kwargs: object) -> requests.Response:
        """One authenticated request (legacy token) with a timeout; raises on an HTTP error, with the body."""
        response = requests.request(
            method,
            f"{self.url}{path}",
            headers={"Authorization": f"Token {self.token}"},
            timeout=HTTP_TIMEOUT,
            **kwargs,  # type: ignore[arg-type]
        )
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path}: HTTP {response.status_code}: {response.text[:500]}")
        return response


@dataclass(frozen=True)
class StudioProject:
    """A project with BCCD images imported as tasks (task ids in upload order, their source files)."""

    id: int
    task_ids: tuple[int, ...]
    images: tuple[Path, ...]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This process's environment without what Label Studio or MAGRAL would read from it."""
    prefixes = ("LABEL_STUDIO_", "HEARTEX_", "MAGRAL_", "DJANGO_")
    dropped = {"HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "DATABASE_NAME", "REDIS_URL"}
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in dropped}


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the process's group, SIGKILL it after `timeout` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url}: process exited with {process.returncode}; log tail:\n{tail(log)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer 200 within {timeout:.0f} s; log tail:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StudioServer]:
    """Label Studio 1.23.2 on a free port of 127.0.0.1 for the whole session."""
    env = clean_env()
    started = time.monotonic()
    try:
        subprocess.run(
            ["bash", str(SCRIPT), "install"],
            env=env,
            timeout=INSTALL_TIMEOUT,
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{SCRIPT} install took more than {INSTALL_TIMEOUT} s")
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"{SCRIPT} install failed ({exc.returncode}):\n{exc.stderr[-3000:]}")
    installed = time.monotonic()
    root = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    log = root / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", str(SCRIPT), "run", str(root / "data"), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: teardown stops every child with it
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/health", process, log, START_TIMEOUT)
        started_in = time.monotonic() - installed
        print(f"\nlabel studio: install/check {installed - started:.1f} s, start {started_in:.1f} s")
        yield StudioServer(url=url, token=LEGACY_TOKEN, log=log)
    finally:
        stop_process_group(process)


@pytest.fixture(scope="session")
def bccd_images(bccd_root: Path) -> tuple[Path, ...]:
    """The first N_IMAGES BCCD training images by file name (read in place, never copied)."""
    coco = json.loads((bccd_root / "annotations.json").read_text())
    names = sorted(img["file_name"] for img in coco["images"] if img.get("split") == "train")
    return tuple(bccd_root / name for name in names[:N_IMAGES])


def create_project(server: StudioServer, title: str, images: Sequence[Path]) -> StudioProject:
    """A RectangleLabels project for BCCD's classes with one task per image (multipart upload)."""
    project = server.api(
        "POST", "/api/projects", json={"title": title[:50], "label_config": BCCD_CONFIG}
    ).json()
    # One file per form field: Label Studio keeps a single file per field name.
    with contextlib.ExitStack() as stack:
        files = {
            f"file{i}": (path.name, stack.enter_context(path.open("rb")), "image/jpeg")
            for i, path in enumerate(images)
        }
        imported = server.api("POST", f"/api/projects/{project['id']}/import", files=files).json()
    if imported.get("task_count") != len(images):
        raise AssertionError(f"expected {len(images)} tasks imported, found {imported}")
    tasks = server.api("GET", f"/api/tasks/?project={project['id']}&page_size={len(images)}").json()["tasks"]
    ids = tuple(int(t["id"]) for t in sorted(tasks, key=lambda t: t["id"]))
    return StudioProject(id=int(project["id"]), task_ids=ids, images=tuple(images))


@pytest.fixture(scope="session")
def bccd_project(label_studio: StudioServer, bccd_images: tuple[Path, ...]) -> StudioProject:
    """A project the tests only read."""
    return create_project(label_studio, "bccd read-only", bccd_images)
