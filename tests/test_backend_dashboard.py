"""The `/status` dashboard, the learning-curve PNG and the ranking endpoint, via the test client."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from redis import Redis
from service_fixtures import FakeStudio, studio_with, toy_steps
from test_backend_protocol import SETUP, basic, make_app

from backend.dashboard import stage_names
from backend.services import Services
from magral_core.atomic import read_json, write_json
from magral_core.service import stages
from magral_core.service.staging import METRICS_FILE as METRICS
from magral_core.service.staging import RANKING_FILE as RANKING
from magral_core.service.store import ModelStore

pytest_plugins = ["service_fixtures"]

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
HOSTILE = '<script>alert("x")</script>'


@pytest.fixture
def studio(tmp_path: Path) -> FakeStudio:
    return studio_with(tmp_path, labeled=[1, 2], unlabeled=[3, 4, 5])


def trained(
    tmp_path: Path, redis: Redis | None, studio: FakeStudio, **changes: Any
) -> tuple[FlaskClient, Services]:
    app, services = make_app(tmp_path, redis, studio, **changes)
    config = app.config["MAGRAL_CONFIG"]
    stages.run_round(2, client=studio, store=services.store, config=config, steps=toy_steps())
    return app.test_client(), services


def test_status_is_json_for_clients_and_html_for_browsers(
    tmp_path: Path, redis_db: Redis, studio: FakeStudio
) -> None:
    client, _ = trained(tmp_path, redis_db, studio)
    for headers, query in (({}, ""), ({"Accept": "application/json"}, ""), (BROWSER, "?format=json")):
        response = client.get("/status" + query, headers=headers)
        assert response.mimetype == "application/json"
        project = response.get_json()["projects"][0]
        assert project["current_version"] == "magral-2-v0001" and project["labeled"] == 2
        assert project["forecast"]["method"] == "none"  # two labels: no validation mAP yet
    assert response.get_json()["queue"]["workers"] == 0
    page = client.get("/status", headers=BROWSER)
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "magral-2-v0001" in html and "round 1 · entropy_max" in html
    assert "/projects/2/curve.png" in html and "<script>" in html  # the inline progress poller
    assert 'src="http' not in html and "<link" not in html  # no external asset
    assert client.get("/status?format=html").mimetype == "text/html"
    assert client.get("/status?format=xml").status_code == 400


def test_rounds_record_per_stage_seconds_and_the_page_shows_them(
    tmp_path: Path, redis_db: Redis, studio: FakeStudio
) -> None:
    client, services = trained(tmp_path, redis_db, studio)
    metrics = services.store.load_metrics(2, "magral-2-v0001")
    # pushing comes after the metrics are published (stages.announce)
    assert {"fetching", "training", "scoring", "ranking"} <= set(metrics["stage_seconds"])
    in_jobs = sum(v for k, v in metrics["stage_seconds"].items() if k != "queued")
    assert metrics["duration_s"] >= in_jobs - 0.01
    html = client.get("/status", headers=BROWSER).get_data(as_text=True)
    assert "<th>training</th>" in html and "<th>ranking</th>" in html


def test_hostile_strings_are_escaped(tmp_path: Path, redis_db: Redis, studio: FakeStudio) -> None:
    client, services = trained(tmp_path, redis_db, studio)
    version_dir = services.store.version_dir(2, "magral-2-v0001")
    metrics = read_json(version_dir / METRICS)
    write_json(version_dir / METRICS, metrics | {"strategy": HOSTILE})
    services.store.record_error(2, f"image {HOSTILE} of task 3: 404", stage="round")
    html = client.get("/status", headers=BROWSER).get_data(as_text=True)
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    error = client.get("/status").get_json()["projects"][0]["last_error"]
    assert error["message"].startswith("image <script>")  # JSON carries the raw text


def test_curve_is_a_png_cached_per_version(tmp_path: Path, redis_db: Redis, studio: FakeStudio) -> None:
    client, services = trained(tmp_path, redis_db, studio)
    response = client.get("/projects/2/curve.png")
    assert response.status_code == 200 and response.mimetype == "image/png"
    png = response.get_data()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    # the same version and rounds give the cached bytes, even after the metrics on disk change
    version_dir = services.store.version_dir(2, "magral-2-v0001")
    write_json(version_dir / METRICS, read_json(version_dir / METRICS) | {"map": 0.4, "ap50": 0.6})
    assert client.get("/projects/2/curve.png").get_data() == png
    assert client.get("/projects/99/curve.png").status_code == 404


def test_ranking_lists_the_next_tasks_with_their_signals(tmp_path: Path, studio: FakeStudio) -> None:
    client, _ = trained(tmp_path, None, studio, label_studio_url="http://ls.example:8080/")
    answer = client.get("/projects/2/ranking").get_json()
    assert answer["version"] == "magral-2-v0001" and answer["strategy"] == "entropy_max"
    assert answer["total"] == 3
    # toy ranking: highest task id first, priority = task id; one box of score 0.9 per image
    assert [t["task"] for t in answer["tasks"]] == [5, 4, 3]
    first = answer["tasks"][0]
    assert first["rank"] == 0 and first["score"] == 0.0 and first["priority"] == 5.0
    assert first["boxes"] == 1 and first["best_score"] == pytest.approx(0.9) and first["note"] == ""
    # no class probabilities: the binary entropy of the 0.9 score
    assert first["uncertainty"] == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), abs=1e-3)
    assert first["url"] == "http://ls.example:8080/projects/2/data?task=5"
    assert [t["task"] for t in client.get("/projects/2/ranking?limit=2").get_json()["tasks"]] == [5, 4]


@pytest.mark.parametrize("limit", ["0", "-3", "abc", "1001", "2.5"])
def test_ranking_limit_is_validated(tmp_path: Path, studio: FakeStudio, limit: str) -> None:
    client, _ = trained(tmp_path, None, studio)
    response = client.get(f"/projects/2/ranking?limit={limit}")
    assert response.status_code == 400
    assert "expected ?limit= an integer from 1 to 1000" in response.get_json()["error"]


def test_ranking_of_an_unknown_or_untrained_project(tmp_path: Path, studio: FakeStudio) -> None:
    client, services = trained(tmp_path, None, studio)
    response = client.get("/projects/7/ranking")
    assert response.status_code == 404 and "project this backend knows" in response.get_json()["error"]
    services.store.save_label_config(8, "<View/>")  # /setup seen, nothing trained yet
    empty = {"project": 8, "version": None, "total": 0, "tasks": []}
    assert client.get("/projects/8/ranking").get_json() == empty


def test_no_box_above_the_threshold_is_said_with_the_best_score(tmp_path: Path, studio: FakeStudio) -> None:
    # toy boxes score 0.9: a threshold of 0.95 hides every one of them
    client, _ = trained(tmp_path, None, studio, prediction_threshold=0.95)
    first = client.get("/projects/2/ranking").get_json()["tasks"][0]
    assert first["boxes"] == 0 and "no box at or above 0.95 (best score 0.90)" in first["note"]
    html = client.get("/status", headers=BROWSER).get_data(as_text=True)
    assert "no box at or above 0.95 (best score 0.90)" in html


def test_a_ranking_without_signals_still_shows(tmp_path: Path, studio: FakeStudio) -> None:
    client, services = trained(tmp_path, None, studio)
    path = services.store.version_dir(2, "magral-2-v0001") / RANKING
    kept = ("version", "strategy", "task_ids", "scores", "priorities")
    old = {k: v for k, v in json.loads(path.read_text()).items() if k in kept}
    write_json(path, old)
    first = client.get("/projects/2/ranking").get_json()["tasks"][0]
    assert first["boxes"] is None and first["note"] == "" and first["url"] is None


def test_forecast_appears_once_rounds_have_a_validation_map(tmp_path: Path, studio: FakeStudio) -> None:
    client, services = trained(tmp_path, None, studio)
    store: ModelStore = services.store
    version_dir = store.version_dir(2, "magral-2-v0001")
    for number, (labels, value) in enumerate([(40, 0.30), (60, 0.36), (80, 0.39), (100, 0.41)], start=2):
        target = version_dir.parent / f"magral-2-v{number:04d}"
        target.mkdir()
        metrics = read_json(version_dir / METRICS) | {"n_labeled": labels, "map": value, "ap50": value + 0.2}
        write_json(target / METRICS, metrics | {"version": target.name})
    forecast = client.get("/status").get_json()["projects"][0]["forecast"]
    assert forecast["method"] == "power_law" and forecast["n_labeled"] == 100 and forecast["verdict"]
    html = client.get("/status", headers=BROWSER).get_data(as_text=True)
    assert forecast["message"] in html and "fitted plateau" in html


def test_dashboard_and_curve_are_behind_basic_auth(
    tmp_path: Path, redis_db: Redis, studio: FakeStudio
) -> None:
    client, _ = trained(tmp_path, redis_db, studio, basic_auth_user="ls", basic_auth_pass="s3cret")
    for path in ("/status", "/projects/2/curve.png", "/projects/2/ranking"):
        assert client.get(path, headers=BROWSER).status_code == 401, path
        assert client.get(path, headers=BROWSER | basic("ls", "s3cret")).status_code == 200, path
    assert client.post("/setup", json=SETUP, headers=basic("ls", "s3cret")).status_code == 200


def test_stages_are_shown_in_the_order_a_round_runs_them() -> None:
    rounds = [{"stage_seconds": {"pushing": 1, "fetching": 2, "training": 3}}, {"stage_seconds": {"zeta": 1}}]
    rounds.append({})
    assert stage_names(rounds) == ["fetching", "training", "pushing", "zeta"]
