"""LabelStudioClient against a real Label Studio 1.23.2: tokens, pagination, images, ranking, webhooks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from magral_core.datasets.images import read_image_rgb
from magral_core.studio import (
    ImageFetchError,
    LabelStudioClient,
    LabelStudioError,
    is_personal_access_token,
)
from magral_core.studio.client import _prediction_request

from .conftest import StudioProject, StudioServer, create_project

# label-studio-sdk 2.1.2 refreshes tokens through pydantic's deprecated parse_obj.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore:The `parse_obj` method is deprecated:DeprecationWarning"),
]


def _client(
    server: StudioServer, cache: Path, api_key: str | None = None, **kwargs: object
) -> LabelStudioClient:
    return LabelStudioClient(
        url=server.url,
        api_key=api_key or server.token,
        cache_dir=cache,
        timeout=30.0,
        max_image_bytes=5 * 1024 * 1024,
        max_image_pixels=1_000_000,
        **kwargs,  # type: ignore[arg-type]
    )


def _source(project: StudioProject, image: str) -> Path:
    """The BCCD file a task image came from (uploads are stored as <uuid8>-<original name>)."""
    return next(p for p in project.images if image.endswith("-" + p.name))


@pytest.fixture(scope="module")
def personal_access_token(label_studio: StudioServer) -> str:
    """A personal access token of the admin: `POST /api/token/` (one live token per user, else 409)."""
    listed = label_studio.api("GET", "/api/token/").json()
    assert listed == [], f"expected no personal access token yet, found {len(listed)}"
    token = str(label_studio.api("POST", "/api/token/").json()["token"])
    assert is_personal_access_token(token)
    return token


def test_legacy_token_lists_all_pages(
    label_studio: StudioServer, bccd_project: StudioProject, tmp_path: Path
) -> None:
    client = _client(label_studio, tmp_path, page_size=7)  # 20 tasks: pages of 7, 7, 6, then 404
    assert not client.uses_personal_access_token
    project = client.get_project(bccd_project.id)
    assert "RectangleLabels" in project["label_config"]
    tasks = client.list_tasks(bccd_project.id)
    assert [t.id for t in tasks] == list(bccd_project.task_ids)
    assert all(t.image.startswith(f"/data/upload/{bccd_project.id}/") for t in tasks)
    assert sorted(_source(bccd_project, t.image) for t in tasks) == sorted(bccd_project.images)
    assert all(t.annotations == () for t in tasks)


def test_personal_access_token(
    label_studio: StudioServer, bccd_project: StudioProject, personal_access_token: str, tmp_path: Path
) -> None:
    client = _client(label_studio, tmp_path, api_key=personal_access_token, page_size=9)
    assert client.uses_personal_access_token
    assert client.auth_headers()["Authorization"].startswith("Bearer ")
    tasks = client.list_tasks(bccd_project.id)
    assert len(tasks) == len(bccd_project.task_ids)
    path = client.fetch_image(tasks[0].image, task_id=tasks[0].id)  # /data/upload with the access token
    assert read_image_rgb(path).shape == (480, 640, 3)


def test_wrong_token_is_refused(
    label_studio: StudioServer, bccd_project: StudioProject, tmp_path: Path
) -> None:
    client = _client(label_studio, tmp_path, api_key="f" * 40)
    with pytest.raises(LabelStudioError, match="HTTP 401") as info:
        client.get_project(bccd_project.id)
    assert info.value.status == 401 and "Traceback" not in str(info.value)


def test_fetch_image_is_the_uploaded_file(
    label_studio: StudioServer, bccd_project: StudioProject, tmp_path: Path
) -> None:
    client = _client(label_studio, tmp_path)
    task = client.list_tasks(bccd_project.id)[3]
    path = client.fetch_image(task.image, task_id=task.id)
    np.testing.assert_array_equal(read_image_rgb(path), read_image_rgb(_source(bccd_project, task.image)))
    assert client.fetch_image(task.image, task_id=task.id) == path  # cached
    with pytest.raises(ImageFetchError, match="expected HTTP 200 with the image, found HTTP 500"):
        client.fetch_image(f"/data/upload/{bccd_project.id}/missing.jpg", task_id=task.id)


def test_predictions_rank_what_label_studio_serves_next(
    label_studio: StudioServer, bccd_images: tuple[Path, ...], tmp_path: Path
) -> None:
    project = create_project(label_studio, "bccd ranking", bccd_images)
    client = _client(label_studio, tmp_path)
    rng = np.random.default_rng(0)
    scores = rng.permutation(len(project.task_ids)) / len(project.task_ids) + 0.01  # distinct, in (0, 1]
    box = {"x": 10.0, "y": 10.0, "width": 20.0, "height": 20.0, "rotation": 0, "rectanglelabels": ["WBC"]}
    predictions = [
        {
            "task": task,
            "result": [{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "value": box}],
            "score": float(score),
            "model_version": "e2e-v1",
        }
        for task, score in zip(project.task_ids, scores, strict=True)
    ]
    assert client.import_predictions(project.id, predictions) == len(predictions)
    client.serve_in_ranked_order(project.id, "e2e-v1")
    details = client.get_project(project.id)
    assert (details["sampling"], details["model_version"]) == ("Uncertainty sampling", "e2e-v1")
    by_score = [project.task_ids[i] for i in np.argsort(scores)]
    served = []
    for _ in range(3):  # lowest score first; annotating a task moves /next/ on to the following one
        task = label_studio.api("GET", f"/api/projects/{project.id}/next/").json()
        served.append(int(task["id"]))
        label_studio.api("POST", f"/api/tasks/{task['id']}/annotations/", json={"result": []})
    assert served == by_score[:3]
    with pytest.raises(LabelStudioError, match=r"HTTP 400.*invalid"):
        client.import_predictions(
            project.id, [{"task": 10**6, "result": [], "score": 0.5, "model_version": "v"}]
        )


def test_add_webhook_header(label_studio: StudioServer, bccd_project: StudioProject, tmp_path: Path) -> None:
    backend = "http://127.0.0.1:9"  # never called: Label Studio only stores the webhook here
    hook = label_studio.api(
        "POST", "/api/webhooks/", json={"project": bccd_project.id, "url": f"{backend}/webhook"}
    ).json()
    other = label_studio.api(
        "POST", "/api/webhooks/", json={"project": bccd_project.id, "url": "http://127.0.0.1:8/hook"}
    ).json()
    client = _client(label_studio, tmp_path)
    assert client.add_webhook_header(bccd_project.id, backend, {"Authorization": "Basic dTpw"}) == 1
    assert label_studio.api("GET", f"/api/webhooks/{hook['id']}/").json()["headers"] == {
        "Authorization": "Basic dTpw"
    }
    assert label_studio.api("GET", f"/api/webhooks/{other['id']}/").json()["headers"] == {}
    assert (
        client.add_webhook_header(bccd_project.id, backend, {"Authorization": "Basic dTpw"}) == 1
    )  # idempotent


def test_chunked_import_and_deleting_old_versions(
    label_studio: StudioServer, bccd_images: tuple[Path, ...], tmp_path: Path
) -> None:
    import time

    project = create_project(label_studio, "bccd hygiene", bccd_images)
    client = _client(label_studio, tmp_path, predictions_per_request=7)
    for version in ("e2e-a", "e2e-b", "e2e-c"):
        predictions = [
            {"task": task, "result": [], "score": 0.5, "model_version": version} for task in project.task_ids
        ]
        started = time.perf_counter()
        assert client.import_predictions(project.id, predictions) == len(predictions)
        elapsed = time.perf_counter() - started
        print(f"imported {len(predictions)} in {elapsed:.3f} s ({len(predictions) / elapsed:.0f}/s)")
    n = len(project.task_ids)
    assert client.model_versions(project.id) == {"e2e-c": n, "e2e-b": n, "e2e-a": n}
    assert client.delete_predictions(project.id, keep_versions={"e2e-c", "e2e-b"}) == n
    assert client.model_versions(project.id) == {"e2e-c": n, "e2e-b": n}
    tasks = label_studio.api("GET", f"/api/tasks/?project={project.id}&fields=all&page_size=100").json()
    assert all(len(t["predictions"]) == 2 for t in tasks["tasks"])
    # A chunk re-sent after a lost answer creates nothing twice: the check sees every task has its prediction.
    chunk = [
        _prediction_request({"task": t, "result": [], "score": 0.5, "model_version": "e2e-c"})
        for t in project.task_ids[:5]
    ]
    assert client._without_prediction(project.id, chunk) == []
