"""The whole loop against a real Label Studio: `magral serve` connected as the ML backend, annotations made
in Label Studio, "Start training" → a round → Label Studio serves the round's first pick next. The first
round has too few labels for MAGRAL and ranks with the fallback strategy; after one more label the second
round is MAGRAL's and publishes the next version. Toy sizes (small images, one epoch, two look-up-table
records, a few policy episodes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from magral_core.boxes import coco_xywh_to_xyxy, xyxy_to_labelstudio_percent
from magral_core.service.store import ModelStore, version_number

from .conftest import (
    BCCD_CLASSES,
    HTTP_TIMEOUT,
    StudioServer,
    clean_env,
    create_project,
    free_port,
    stop_process_group,
    tail,
    wait_healthy,
)

pytestmark = pytest.mark.e2e

BACKEND_START_TIMEOUT = 120  # s: gunicorn + embedded Redis + worker
ROUND_TIMEOUT = 600  # s for one toy round on a busy 2-core machine
N_LABELED = 12  # annotated before the first round: one short of MAGRAL_MIN_LABELED
MAIN = "import sys; from magral_core.cli import main; sys.exit(main())"


@dataclass(frozen=True)
class Backend:
    url: str
    home: Path
    log: Path

    def status(self, project: int) -> dict[str, Any]:
        answer = requests.get(f"{self.url}/status", params={"project": project}, timeout=HTTP_TIMEOUT)
        answer.raise_for_status()
        return dict(answer.json()["projects"][0]) if answer.json()["projects"] else {}


@pytest.fixture(scope="module")
def backend(label_studio: StudioServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """`magral serve` on a free port (embedded Redis and one worker), configured for toy rounds."""
    home = tmp_path_factory.mktemp("magral-home")
    port = free_port()
    env = clean_env() | {
        "MAGRAL_HOME": str(home),
        "MAGRAL_HOST": "127.0.0.1",
        "MAGRAL_PORT": str(port),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "MAGRAL_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MAGRAL_IMAGE_SIZE": "160",
        "MAGRAL_EPOCHS": "1",
        "MAGRAL_BATCH_SIZE": "2",
        "MAGRAL_BUDGET": "3",
        "MAGRAL_LUT_RECORDS": "2",
        "MAGRAL_POLICY_EPISODES": "5",
        "MAGRAL_MIN_LABELED": str(N_LABELED + 1),
        "MAGRAL_MIN_NEW_ANNOTATIONS": "1000",  # rounds start from "Start training" only
        "MAGRAL_SEED": "0",
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


@pytest.fixture(scope="module")
def bccd_coco(bccd_root: Path) -> Any:
    return json.loads((bccd_root / "annotations.json").read_text())


def _annotate(server: StudioServer, task_id: int, coco: Any) -> None:
    """Annotate a task with its BCCD ground-truth boxes (percent of the image, as Label Studio keeps them)."""
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


def _train_and_wait(
    server: StudioServer, backend: Backend, project: int, ml_id: int, previous: str | None
) -> str:
    """Press "Start training" (POST /api/ml/{id}/train) and wait for a new published version."""
    error_before = backend.status(project).get("last_error")
    server.api("POST", f"/api/ml/{ml_id}/train", json={})
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


def _next_task(server: StudioServer, project: int) -> int:
    return int(server.api("GET", f"/api/projects/{project}/next/").json()["id"])


def test_rounds_drive_what_label_studio_serves(
    label_studio: StudioServer, backend: Backend, bccd_images: tuple[Path, ...], bccd_coco: Any
) -> None:
    started = time.monotonic()
    project = create_project(label_studio, "bccd magral rounds", bccd_images)
    ml = label_studio.api(
        "POST", "/api/ml", json={"url": backend.url, "project": project.id, "title": "MAGRAL"}
    ).json()
    for task_id in project.task_ids[:N_LABELED]:
        _annotate(label_studio, task_id, bccd_coco)
    store = ModelStore(backend.home / "projects")

    first = _train_and_wait(label_studio, backend, project.id, int(ml["id"]), None)
    first_done = time.monotonic()
    ranking = store.load_ranking(project.id, first)
    assert ranking.strategy == "entropy_max"  # the default fallback below MAGRAL_MIN_LABELED
    unlabeled = set(project.task_ids[N_LABELED:])
    assert set(ranking.task_ids) == unlabeled
    details = label_studio.api("GET", f"/api/projects/{project.id}/").json()
    assert (details["sampling"], details["model_version"]) == ("Uncertainty sampling", first)
    assert _next_task(label_studio, project.id) == ranking.task_ids[0]

    # Label MAGRAL's pick, train again: the next version ranks the rest and Label Studio follows it.
    _annotate(label_studio, ranking.task_ids[0], bccd_coco)
    second = _train_and_wait(label_studio, backend, project.id, int(ml["id"]), first)
    assert version_number(second) == version_number(first) + 1
    second_ranking = store.load_ranking(project.id, second)
    assert second_ranking.strategy == "magral"
    assert set(second_ranking.task_ids) == unlabeled - {ranking.task_ids[0]}
    details = label_studio.api("GET", f"/api/projects/{project.id}/").json()
    assert details["model_version"] == second
    assert _next_task(label_studio, project.id) == second_ranking.task_ids[0]
    print(f"\nrounds: first {first_done - started:.0f} s, second {time.monotonic() - first_done:.0f} s")
