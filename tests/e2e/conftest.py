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
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from magral_core.boxes import coco_xywh_to_xyxy, xyxy_to_labelstudio_percent

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "labelstudio.sh"
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"  # the script's default, baked into its template
ADMIN_EMAIL = "admin@example.com"  # the script's admin user and default password, baked into its template
ADMIN_PASSWORD = "magral-e2e-password"
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
    email: str = ADMIN_EMAIL
    password: str = ADMIN_PASSWORD

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


def first_train_images(bccd_root: Path, count: int) -> tuple[Path, ...]:
    """The first `count` BCCD training images by file name (read in place, never copied)."""
    coco = json.loads((bccd_root / "annotations.json").read_text())
    names = sorted(img["file_name"] for img in coco["images"] if img.get("split") == "train")
    return tuple(bccd_root / name for name in names[:count])


@pytest.fixture(scope="session")
def bccd_images(bccd_root: Path) -> tuple[Path, ...]:
    """The first N_IMAGES BCCD training images by file name."""
    return first_train_images(bccd_root, N_IMAGES)


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


BACKEND_START_TIMEOUT = 120  # s: gunicorn + embedded Redis + worker
ROUND_TIMEOUT = 600  # s for one toy round on a busy 2-core machine
MAIN = "import sys; from magral_core.cli import main; sys.exit(main())"
TOY_ROUNDS = {  # small images, one epoch, two look-up-table records, a few policy episodes
    "MAGRAL_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MAGRAL_IMAGE_SIZE": "160",
    "MAGRAL_EPOCHS": "1",
    "MAGRAL_BATCH_SIZE": "2",
    "MAGRAL_BUDGET": "3",
    "MAGRAL_LUT_RECORDS": "2",
    "MAGRAL_POLICY_EPISODES": "5",
    "MAGRAL_SEED": "0",
}


@dataclass(frozen=True)
class Backend:
    """A running `magral serve`: its URL, MAGRAL_HOME and log."""

    url: str
    home: Path
    log: Path

    def status(self, project: int) -> dict[str, Any]:
        """The project's entry of `/status` as JSON ({} before the project is known)."""
        answer = requests.get(f"{self.url}/status", params={"project": project}, timeout=HTTP_TIMEOUT)
        answer.raise_for_status()
        return dict(answer.json()["projects"][0]) if answer.json()["projects"] else {}


@contextlib.contextmanager
def running_backend(studio: StudioServer, home: Path, settings: Mapping[str, str]) -> Iterator[Backend]:
    """`magral serve` on a free port (embedded Redis and one worker) connected to `studio` with the README's
    two variables, plus `settings`; stopped (its process group) on exit."""
    port = free_port()
    env = clean_env() | {
        "MAGRAL_HOME": str(home),
        "MAGRAL_HOST": "127.0.0.1",
        "MAGRAL_PORT": str(port),
        "LABEL_STUDIO_URL": studio.url,
        "LABEL_STUDIO_API_KEY": studio.token,
        **settings,
    }
    log = home / "backend.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", MAIN, "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/health", process, log, BACKEND_START_TIMEOUT)
        yield Backend(url=url, home=home, log=log)
    finally:
        stop_process_group(process, timeout=30)


@pytest.fixture(scope="session")
def bccd_coco(bccd_root: Path) -> Any:
    return json.loads((bccd_root / "annotations.json").read_text())


def annotate(server: StudioServer, task_id: int, coco: Any) -> None:
    """Annotate a task with its BCCD ground-truth boxes (percent of the image, as Label Studio keeps them),
    through the API the labeling UI's Submit button calls."""
    task = server.api("GET", f"/api/tasks/{task_id}").json()
    name = str(task["data"]["image"]).rsplit("/", 1)[-1].split("-", 1)[1]
    image = next(img for img in coco["images"] if Path(img["file_name"]).name == name)
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    xyxy = coco_xywh_to_xyxy(np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4))
    percent = xyxy_to_labelstudio_percent(xyxy, image["width"], image["height"])
    result = [
        {
            "from_name": "label",
            "to_name": "image",
            "type": "rectanglelabels",
            "original_width": image["width"],
            "original_height": image["height"],
            "value": {
                "x": float(x),
                "y": float(y),
                "width": float(w),
                "height": float(h),
                "rotation": 0,
                "rectanglelabels": [BCCD_CLASSES[a["category_id"] - 1]],
            },
        }
        for a, (x, y, w, h) in zip(anns, percent, strict=True)
    ]
    server.api("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result})


def wait_for_version(backend: Backend, project: int, previous: str | None, error_before: Any = None) -> str:
    """Wait until the backend serves a version other than `previous` with no round running; fail on a new
    round error or after ROUND_TIMEOUT."""
    deadline = time.monotonic() + ROUND_TIMEOUT
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = backend.status(project)
        version = status.get("current_version")
        if version and version != previous and not status.get("running"):
            return str(version)
        if status.get("last_error") not in (None, error_before):
            pytest.fail(f"round failed: {status['last_error']}\nbackend log:\n{tail(backend.log, 40)}")
        time.sleep(2)
    pytest.fail(f"no new version within {ROUND_TIMEOUT} s: {status}\nbackend log:\n{tail(backend.log, 40)}")


def train_and_wait(
    server: StudioServer, backend: Backend, project: int, ml_id: int, previous: str | None
) -> str:
    """Press "Start training" (POST /api/ml/{id}/train) and wait for a new published version."""
    error_before = backend.status(project).get("last_error")
    server.api("POST", f"/api/ml/{ml_id}/train", json={})
    return wait_for_version(backend, project, previous, error_before)
