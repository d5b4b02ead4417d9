"""A corpus of malformed requests (tests/fixtures/bad_requests.json) and property-based fuzzing of every
endpoint's JSON: each answer is a 4xx with a JSON error that says what was expected, never a 500 or a
traceback, and a refused request changes nothing (no project appears, nothing is queued, no error is
recorded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis
from service_fixtures import studio_with
from test_backend_protocol import make_app

from magral_core.service.queue import RoundQueue

pytest_plugins = ["service_fixtures"]

CORPUS = json.loads((Path(__file__).parent / "fixtures" / "bad_requests.json").read_text())["requests"]


@pytest.fixture
def served(tmp_path: Path, redis_db: Redis) -> tuple[FlaskClient, Any, Redis]:
    app, services = make_app(tmp_path, redis_db, studio_with(tmp_path, [1], [2]))
    return app.test_client(), services, redis_db


def send(client: FlaskClient, request: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {"headers": {"Accept": "application/json"}}
    if "json" in request:
        kwargs["json"] = request["json"]
    elif "raw" in request:
        kwargs.update(data=request["raw"], content_type="application/json")
    return client.open(request["path"], method=request["method"], **kwargs)


def assert_nothing_changed(services: Any, redis: Redis) -> None:
    assert services.store.projects() == []
    queue = RoundQueue(redis)
    assert queue.queue.count == 0 and queue.pending_annotations(7) == 0


@pytest.mark.parametrize("request_", CORPUS, ids=[f"{r['method']} {r['path']} {r['status']}" for r in CORPUS])
def test_every_bad_request_is_refused_clearly_and_loses_nothing(
    served: tuple[FlaskClient, Any, Redis], request_: dict[str, Any]
) -> None:
    client, services, redis = served
    response = send(client, request_)
    assert response.status_code == request_["status"], response.get_data(as_text=True)[:300]
    body = response.get_json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert request_["says"] in body["error"]
    assert_nothing_changed(services, redis)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.floats(allow_nan=True, allow_subnormal=False),  # subnormals flush to zero where torch is loaded
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(["project", "schema", "tasks", "label_config", "action", "annotation", "annotations",
                        "id", "data", "hostname", "access_token", "model_version"])
BODIES = JSON | st.dictionaries(KEYS, JSON, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/setup", "/predict", "/webhook"]), body=BODIES)
def test_no_json_body_makes_an_endpoint_fail(
    served: tuple[FlaskClient, Any, Redis], path: str, body: Any
) -> None:
    client, _services, _redis = served
    response = client.post(path, data=json.dumps(body), content_type="application/json",
                           headers={"Accept": "application/json"})
    assert response.status_code < 500, response.get_data(as_text=True)[:300]
    assert "Traceback" not in response.get_data(as_text=True)
    if response.status_code >= 400:
        assert response.get_json()["error"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.dictionaries(st.sampled_from(["project", "format", "limit"]), st.text(max_size=12),
                             max_size=3),
       path=st.sampled_from(["/status", "/versions", "/projects/1/ranking", "/projects/1/curve.png"]))
def test_no_query_string_makes_a_read_endpoint_fail(
    served: tuple[FlaskClient, Any, Redis], query: dict[str, str], path: str
) -> None:
    client, _services, _redis = served
    response = client.get(path, query_string=query, headers={"Accept": "application/json"})
    assert response.status_code < 500, response.get_data(as_text=True)[:300]
    assert "Traceback" not in response.get_data(as_text=True)
