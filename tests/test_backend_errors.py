"""Bad input gets a JSON error saying what was expected and what was found, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from redis import Redis
from service_fixtures import LABEL_CONFIG, studio_with
from test_backend_protocol import make_app, predict_body, webhook

from magral_core.service.queue import RoundQueue

pytest_plugins = ["service_fixtures"]


@pytest.fixture
def client(tmp_path: Path, redis_db: Redis) -> FlaskClient:
    app, _ = make_app(tmp_path, redis_db, studio_with(tmp_path, [1], [2]), max_request_bytes=4096)
    return app.test_client()


def error(response: Any, status: int) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == status and "Traceback" not in body["error"]
    return str(body["error"])


@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook"])
def test_malformed_json(client: FlaskClient, path: str) -> None:
    message = error(client.post(path, data="{not json", content_type="application/json"), 400)
    assert "expected a JSON object" in message and "not valid JSON" in message
    assert "empty body" in error(client.post(path, data="", content_type="application/json"), 400)
    assert "found a JSON list" in error(client.post(path, json=[1, 2]), 400)


def test_missing_keys(client: FlaskClient) -> None:
    assert "expected 'schema'" in error(client.post("/setup", json={"project": "2.1"}), 400)
    assert "expected 'project'" in error(client.post("/setup", json={"schema": LABEL_CONFIG}), 400)
    assert "expected 'tasks'" in error(client.post("/predict", json={"project": "2.1"}), 400)
    body = predict_body(3)
    del body["tasks"][0]["id"]
    assert "integer 'id'" in error(client.post("/predict", json=body), 400)
    assert "expected a string 'action'" in error(client.post("/webhook", json={"project": {"id": 2}}), 400)
    assert "expected 'project'" in error(client.post("/webhook", json={"action": "START_TRAINING"}), 400)
    assert "a list 'annotations'" in error(client.post("/webhook", json=webhook("ANNOTATIONS_DELETED")), 400)
    assert "'annotation' to be an object" in error(
        client.post("/webhook", json=webhook("ANNOTATION_CREATED")), 400
    )
    tasks = webhook("TASKS_CREATED", tasks=[{"data": {}}])
    assert "integer 'id'" in error(client.post("/webhook", json=tasks), 400)


def test_predict_with_a_config_without_rectangles(client: FlaskClient) -> None:
    body = {**predict_body(3), "label_config": '<View><Image name="i" value="$image"/></View>'}
    assert "RectangleLabels" in error(client.post("/predict", json=body), 422)
    body["label_config"] = "<View><Image"
    assert "invalid XML" in error(client.post("/predict", json=body), 422)


def test_unknown_actions_are_ignored_with_200(client: FlaskClient, redis_db: Redis) -> None:
    for action in ("PROJECT_UPDATED", "SOMETHING_NEW"):
        response = client.post("/webhook", json=webhook(action))
        assert response.status_code == 200 and response.get_json()["status"] == "ignored"
    assert RoundQueue(redis_db).queue.count == 0


def test_cancelled_and_empty_annotations(client: FlaskClient, redis_db: Redis) -> None:
    cancelled = webhook("ANNOTATION_CREATED", annotation={"id": 1, "result": [], "was_cancelled": True})
    response = client.post("/webhook", json=cancelled).get_json()
    assert response["status"] == "ignored" and "cancelled" in response["reason"]
    assert RoundQueue(redis_db).pending_annotations(2) == 0
    empty = webhook("ANNOTATION_CREATED", annotation={"id": 2, "result": [], "was_cancelled": False})
    response = client.post("/webhook", json=empty).get_json()
    assert response["status"] == "waiting" and "no objects" in response["warnings"][0]
    bad = webhook("ANNOTATION_CREATED", annotation={"id": 3, "result": "boxes"})
    assert "'annotation.result' to be a list" in error(client.post("/webhook", json=bad), 400)


def test_unknown_labels_are_counted_and_reported(client: FlaskClient) -> None:
    result = [
        {
            "from_name": "label",
            "to_name": "image",
            "type": "rectanglelabels",
            "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": [name]},
        }
        for name in ("RBC", "Ghost", "Ghost")
    ]
    body = webhook("ANNOTATION_CREATED", annotation={"id": 1, "result": result})
    response = client.post("/webhook", json=body)
    assert response.status_code == 200
    assert response.get_json()["warnings"] == [
        "2 box(es) with label 'Ghost' ignored: expected one of RBC, WBC"
    ]


def test_body_over_the_limit_is_413(client: FlaskClient) -> None:
    big = {"action": "START_TRAINING", "project": {"id": 2}, "padding": "x" * 5000}
    message = error(client.post("/webhook", json=big), 413)
    assert "at most 4096 bytes" in message


def test_unknown_path_and_wrong_method(client: FlaskClient) -> None:
    assert "/predict" in error(client.get("/nope"), 404)
    assert "POST" in error(client.get("/predict"), 405)
    assert "GET" in error(client.post("/health"), 405)
    assert "?project=<integer id>" in error(client.get("/status?project=abc"), 400)


def test_internal_errors_are_500_without_traceback(tmp_path: Path, redis_db: Redis) -> None:
    app, services = make_app(tmp_path, redis_db, studio_with(tmp_path, [1], [2]))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    services.predictor.predict = broken  # type: ignore[method-assign]
    message = error(app.test_client().post("/predict", json=predict_body(3)), 500)
    assert "RuntimeError" in message and "secret internals" not in message
