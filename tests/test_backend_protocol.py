"""Every endpoint with the payloads Label Studio 1.23 sends (docs/label-studio.md), via the test client."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis
from service_fixtures import LABEL_CONFIG, FakeStudio, studio_with, toy_config, toy_steps

from backend.app import create_app
from backend.predictions import Predictor
from backend.services import Services
from magral_core.config import Config
from magral_core.service import context, stages
from magral_core.service.queue import RoundQueue, round_job_id

pytest_plugins = ["service_fixtures"]


def make_app(
    tmp_path: Path, redis: Redis | None, studio: FakeStudio, **changes: Any
) -> tuple[Flask, Services]:
    config = toy_config(tmp_path / "home", **{"min_new_annotations": 3, **changes})
    store = context.store_for(config)
    predictor = Predictor(store, config, client_for=lambda project: studio, steps=toy_steps)
    services = Services(
        store,
        RoundQueue(redis) if redis is not None else None,
        lambda project: studio,
        predictor,
    )
    return create_app(config, services=services), services


@pytest.fixture
def studio(tmp_path: Path) -> FakeStudio:
    return studio_with(tmp_path, labeled=[1, 2], unlabeled=[3, 4])


@pytest.fixture
def app(tmp_path: Path, redis_db: Redis, studio: FakeStudio) -> Flask:
    return make_app(tmp_path, redis_db, studio)[0]


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def publish_version(app: Flask, studio: FakeStudio, tmp_path: Path) -> str:
    services: Services = app.config["MAGRAL_SERVICES"]
    config: Config = app.config["MAGRAL_CONFIG"]
    return stages.run_round(2, client=studio, store=services.store, config=config, steps=toy_steps())


def task(task_id: int) -> dict[str, Any]:
    return {
        "id": task_id,
        "data": {"image": f"/data/upload/2/img{task_id}.png"},
        "annotations": [],
        "predictions": [],
        "project": 2,
    }


def predict_body(*ids: int) -> dict[str, Any]:
    return {
        "tasks": [task(i) for i in ids],
        "project": "2.1795606833",
        "label_config": LABEL_CONFIG,
        "params": {"login": None, "password": None, "context": None},
    }


SETUP = {
    "project": "2.1795606833",
    "schema": LABEL_CONFIG,
    "hostname": "http://127.0.0.1:8080",
    "access_token": "abc123",
    "extra_params": None,
}


def test_health(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200 and response.get_json()["status"] == "UP"


def test_setup_answers_untrained_then_the_published_version(
    client: FlaskClient, app: Flask, studio: FakeStudio, tmp_path: Path
) -> None:
    response = client.post("/setup", json=SETUP)
    assert response.status_code == 200 and response.get_json() == {"model_version": "untrained"}
    services: Services = app.config["MAGRAL_SERVICES"]
    assert services.store.load_connection(2) == {
        "hostname": "http://127.0.0.1:8080",
        "access_token": "abc123",
    }
    version = publish_version(app, studio, tmp_path)
    assert client.post("/setup", json=SETUP).get_json() == {"model_version": version}


def test_setup_rejects_a_config_without_rectangles_and_status_shows_it(client: FlaskClient) -> None:
    schema = (
        '<View><Image name="i" value="$image"/>'
        '<Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
    )
    assert client.post("/setup", json=SETUP).status_code == 200
    response = client.post("/setup", json={**SETUP, "schema": schema})
    assert response.status_code == 422
    message = response.get_json()["error"]
    assert "expected a <RectangleLabels>" in message and "Choices(c)" in message
    status = client.get("/status?project=2").get_json()["projects"][0]
    assert status["last_error"]["stage"] == "setup" and "RectangleLabels" in status["last_error"]["message"]
    assert client.post("/setup", json=SETUP).status_code == 200  # an accepted setup clears it
    assert client.get("/status?project=2").get_json()["projects"][0]["last_error"] is None


def test_setup_of_an_unknown_project_creates_no_state_until_its_schema_parses(client: FlaskClient) -> None:
    bad = ({**SETUP, "project": 9, "schema": "<View>"}, {"project": 9}, {**SETUP, "project": 9, "schema": ""})
    for body in bad:
        assert client.post("/setup", json=body).status_code in (400, 422)
    assert client.get("/status").get_json()["projects"] == []
    assert client.post("/setup", json={**SETUP, "project": 9}).status_code == 200
    assert [p["project"] for p in client.get("/status").get_json()["projects"]] == [9]


def test_an_anonymous_malformed_setup_cannot_overwrite_a_projects_errors(
    client: FlaskClient, app: Flask
) -> None:
    services: Services = app.config["MAGRAL_SERVICES"]
    assert client.post("/setup", json=SETUP).status_code == 200
    services.store.record_error(2, "RuntimeError: the round's own failure", stage="round")
    for body in ({"project": 2}, {"project": 2, "schema": "<View>"}, {"project": 2, "schema": 7}):
        assert client.post("/setup", json=body).status_code in (400, 422)
    errors = client.get("/status?project=2").get_json()["projects"][0]["errors"]
    assert list(errors) == ["round"] and "own failure" in errors["round"]["message"]
    # a well-formed one (what Label Studio sends) is recorded apart, and the round's error is kept
    assert client.post("/setup", json={**SETUP, "schema": "<View>"}).status_code == 422
    errors = client.get("/status?project=2").get_json()["projects"][0]["errors"]
    assert sorted(errors) == ["round", "setup"] and "own failure" in errors["round"]["message"]


def test_predict_before_training_gives_one_empty_untrained_result_per_task(client: FlaskClient) -> None:
    response = client.post("/predict", json=predict_body(3, 4, 9))
    assert response.status_code == 200
    assert response.get_json()["results"] == [{"model_version": "untrained", "result": []}] * 3


def test_predict_serves_stored_predictions_in_task_order(
    client: FlaskClient, app: Flask, studio: FakeStudio, tmp_path: Path
) -> None:
    version = publish_version(app, studio, tmp_path)
    results = client.post("/predict", json=predict_body(3, 4)).get_json()["results"]
    assert [r["model_version"] for r in results] == [version, version]
    assert [r["score"] for r in results] == [1.0, 0.0]  # toy ranking: highest task id best → lowest score
    item = results[0]["result"][0]
    assert item["from_name"] == "label" and item["to_name"] == "image" and item["type"] == "rectanglelabels"
    assert item["value"]["rectanglelabels"] == ["RBC"]
    assert {"x", "y", "width", "height", "rotation"} <= set(item["value"])
    assert item["original_width"] == 64 and item["original_height"] == 48
    predictor: Predictor = app.config["MAGRAL_SERVICES"].predictor
    assert predictor.loads == 0  # stored predictions need no weights


def test_predict_runs_the_cached_detector_only_for_unscored_tasks(
    client: FlaskClient, app: Flask, studio: FakeStudio, tmp_path: Path
) -> None:
    version = publish_version(app, studio, tmp_path)
    studio.add_task(8)
    studio.add_task(9)
    predictor: Predictor = app.config["MAGRAL_SERVICES"].predictor
    first = client.post("/predict", json=predict_body(8, 3)).get_json()["results"]
    assert [r["score"] for r in first] == [1.0, 1.0] and first[0]["model_version"] == version
    assert first[0]["result"][0]["value"]["x"] == pytest.approx(15.625)
    client.post("/predict", json=predict_body(9))
    assert predictor.loads == 1  # loaded once, reused
    publish_version(app, studio, tmp_path)  # ranks 8 and 9 too
    client.post("/predict", json=predict_body(9))
    assert predictor.loads == 1
    studio.add_task(10)
    client.post("/predict", json=predict_body(10))
    assert predictor.loads == 2  # reloaded because the published version changed


def test_predict_gives_an_empty_result_for_a_task_without_its_image(
    client: FlaskClient, app: Flask, studio: FakeStudio, tmp_path: Path
) -> None:
    publish_version(app, studio, tmp_path)
    studio.add_task(8)
    body = predict_body(8, 9, 3)  # task 9 has no image in the fake Label Studio
    body["tasks"].append({"id": 10, "data": {"text": "no image key"}})
    results = client.post("/predict", json=body).get_json()["results"]
    assert [len(r["result"]) for r in results] == [1, 0, 1, 0]


def test_predict_drops_boxes_whose_label_left_the_config(
    client: FlaskClient, app: Flask, studio: FakeStudio, tmp_path: Path
) -> None:
    publish_version(app, studio, tmp_path)
    body = predict_body(3)
    body["label_config"] = LABEL_CONFIG.replace('<Label value="RBC"/>', "")
    assert client.post("/predict", json=body).get_json()["results"][0]["result"] == []


def webhook(action: str, **extra: Any) -> dict[str, Any]:
    return {
        "action": action,
        "project": {
            "id": 2,
            "label_config": LABEL_CONFIG,
            "model_version": "x",
            "sampling": "Sequential sampling",
        },
        **extra,
    }


def annotation(annotation_id: int, *, cancelled: bool = False, labels: tuple[str, ...] = ("RBC",)) -> dict:
    result = [
        {
            "from_name": "label",
            "to_name": "image",
            "type": "rectanglelabels",
            "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rotation": 0, "rectanglelabels": [label]},
        }
        for label in labels
    ]
    return {"id": annotation_id, "result": result, "task": 3, "completed_by": 1, "was_cancelled": cancelled}


def test_webhook_counts_annotations_until_the_minimum_then_enqueues(
    client: FlaskClient, redis_db: Redis
) -> None:
    body = webhook("ANNOTATION_CREATED", annotation=annotation(1), task=task(3))
    statuses = [client.post("/webhook", json=body).get_json()["status"] for _ in range(2)]
    assert statuses == ["waiting", "waiting"]
    third = client.post(
        "/webhook", json=webhook("ANNOTATION_UPDATED", annotation=annotation(1), task=task(3))
    )
    assert third.status_code == 200 and third.get_json()["status"] == "enqueued"
    assert third.get_json()["pending_annotations"] == 3
    burst = {client.post("/webhook", json=body).get_json()["status"] for _ in range(100)}
    assert burst == {"coalesced"}
    assert RoundQueue(redis_db).queue.job_ids == [round_job_id(2)]


def test_webhook_bulk_created_and_deleted_count_every_annotation(client: FlaskClient) -> None:
    bulk = webhook(
        "ANNOTATIONS_CREATED", annotation=[annotation(1), annotation(2), annotation(3, cancelled=True)]
    )
    response = client.post("/webhook", json=bulk).get_json()
    assert response["status"] == "waiting" and response["pending_annotations"] == 2
    deleted = client.post(
        "/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}], "project": {"id": 2}}
    ).get_json()
    assert deleted["status"] == "enqueued" and deleted["pending_annotations"] == 3


def test_start_training_always_enqueues(client: FlaskClient) -> None:
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}})
    assert response.status_code == 200 and response.get_json()["status"] == "enqueued"


def test_tasks_created_is_scored_only_once_a_version_exists(
    client: FlaskClient, app: Flask, studio: FakeStudio, tmp_path: Path, redis_db: Redis
) -> None:
    body = webhook("TASKS_CREATED", tasks=[task(8), task(9)])
    assert client.post("/webhook", json=body).get_json()["status"] == "ignored"
    publish_version(app, studio, tmp_path)
    assert client.post("/webhook", json=body).get_json()["status"] == "enqueued"
    queued = RoundQueue(redis_db).queue.jobs
    assert [j.func_name for j in queued] == ["magral_core.service.jobs.score_tasks"]
    assert queued[0].args[1] == [8, 9]


def test_versions_and_status(client: FlaskClient, app: Flask, studio: FakeStudio, tmp_path: Path) -> None:
    assert client.get("/versions").get_json() == {"versions": [], "model_version": "untrained"}
    version = publish_version(app, studio, tmp_path)
    assert client.get("/versions?project=2").get_json() == {"versions": [version], "model_version": version}
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}})
    status = client.get("/status").get_json()["projects"]
    assert len(status) == 1
    project = status[0]
    assert project["current_version"] == version and project["labeled"] == 2 and project["unlabeled"] == 2
    # two labeled tasks are too few to hold some out for validation: no mAP yet
    assert project["rounds"] == [
        {
            "map": None,
            "ap50": None,
            "n_labeled": 2,
            "n_unlabeled": 2,
            "strategy": "entropy_max",
            "version": version,
        }
    ]
    assert project["running"]["job_id"] == round_job_id(2) and project["running"]["status"] == "queued"
    assert project["last_error"] is None


def test_webhook_without_a_queue_is_503_with_a_message(tmp_path: Path, studio: FakeStudio) -> None:
    app, _ = make_app(tmp_path, None, studio)
    response = app.test_client().post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}})
    assert response.status_code == 503 and "REDIS_URL" in response.get_json()["error"]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_guards_every_endpoint_and_secures_the_project_webhook(
    tmp_path: Path, redis_db: Redis, studio: FakeStudio
) -> None:
    app, _ = make_app(tmp_path, redis_db, studio, basic_auth_user="ls", basic_auth_pass="s3cret")
    client = app.test_client()
    for method, path in (
        ("get", "/health"),
        ("post", "/setup"),
        ("post", "/predict"),
        ("post", "/webhook"),
        ("get", "/versions"),
        ("get", "/status"),
    ):
        response = getattr(client, method)(path, json={})
        assert response.status_code == 401, path
        assert "basic auth" in response.get_json()["error"] and "WWW-Authenticate" in response.headers
    assert client.get("/health", headers=basic("ls", "wrong")).status_code == 401
    assert client.get("/health", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert client.get("/health", headers=basic("ls", "s3cret")).status_code == 200
    assert client.post("/setup", json=SETUP, headers=basic("ls", "s3cret")).status_code == 200
    queued = RoundQueue(redis_db).queue.jobs
    assert [j.func_name for j in queued] == ["magral_core.service.jobs.secure_webhook"]
    assert queued[0].args[:2] == (2, "http://localhost/")
