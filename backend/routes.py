"""The endpoints Label Studio calls, plus `/status`. None of them trains or loads weights for long:
`/webhook` validates and enqueues, `/predict` answers from the served version (see `backend.predictions`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, current_app, jsonify, make_response, request
from flask.typing import ResponseReturnValue
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from backend import dashboard
from backend.errors import ApiError
from backend.predictions import UNTRAINED
from backend.services import Services
from backend.status import (
    VersionCache,
    curve_png,
    load_rounds,
    next_tasks,
    project_status,
    queue_status,
)
from backend.task_ranking import parse_limit
from backend.webhook import parse_event, project_id
from magral_core.studio.label_config import LabelConfig, LabelConfigError, parse_label_config

log = logging.getLogger(__name__)
blueprint = Blueprint("magral", __name__)
STATUS_POLL_S = 3  # how often the dashboard polls the JSON for the running round's progress
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
QUEUE_UNREACHABLE = (
    "expected the job queue (Redis) to be reachable, found it unreachable: event not queued; nothing is "
    "lost, the next round re-reads every annotation from Label Studio and picks this event up"
)


def _services() -> Services:
    services: Services = current_app.config["MAGRAL_SERVICES"]
    return services


def _json_object() -> Mapping[str, Any]:
    """The request body as a JSON object; ApiError(400) otherwise."""
    body = request.get_json(silent=True)
    if body is None:
        found = "an empty body" if not request.get_data(cache=True) else "a body that is not valid JSON"
        raise ApiError(400, f"expected a JSON object (Content-Type: application/json), found {found}")
    if not isinstance(body, Mapping):
        raise ApiError(400, f"expected a JSON object, found a JSON {type(body).__name__}")
    return body


def _project(body: Mapping[str, Any], *fallbacks: Any) -> int:
    for value in (body.get("project"), *fallbacks):
        project = project_id(value)
        if project is not None:
            return project
    raise ApiError(
        400, f"expected 'project' as an id like 2 or '2.1795606833', found {body.get('project')!r:.80}"
    )


def _label_config(project: int, xml: Any) -> LabelConfig:
    if not isinstance(xml, str) or not xml.strip():
        xml = _services().store.load_label_config(project)
    if xml is None:
        raise ApiError(400, "expected 'label_config' (or an earlier /setup with 'schema'), found none")
    try:
        return parse_label_config(xml)
    except LabelConfigError as exc:
        raise ApiError(422, str(exc)) from None


def _version_name(project: int) -> str:
    return _services().store.current_version(project) or UNTRAINED


@blueprint.get("/health")
def health() -> ResponseReturnValue:
    return jsonify({"status": "UP", "model_class": "MAGRAL"})


@blueprint.post("/setup")
def setup() -> ResponseReturnValue:
    """Check the label config, remember how to reach Label Studio, answer the current model version."""
    body = _json_object()
    services = _services()
    project = _project(body)
    schema = body.get("schema")
    if not isinstance(schema, str) or not schema.strip():
        message = f"expected 'schema' (the project's label config XML), found {schema!r:.80}"
        _record_setup_error(project, body, message)
        raise ApiError(400, message)
    try:
        parse_label_config(schema)
    except LabelConfigError as exc:
        _record_setup_error(project, body, str(exc))
        raise ApiError(422, str(exc)) from None
    if project in services.store.projects():
        services.store.clear_error(project, stage="setup")
    if services.store.load_label_config(project) != schema:
        services.store.save_label_config(project, schema)
    details = {k: body[k] for k in ("hostname", "access_token") if isinstance(body.get(k), str) and body[k]}
    if details and services.store.load_connection(project) != details:
        services.store.save_connection(project, details)
    config = current_app.config["MAGRAL_CONFIG"]
    if config.basic_auth_user and services.queue is not None:
        try:
            services.queue.enqueue_webhook_auth(project, request.host_url)
        except REDIS_DOWN as exc:  # the next /setup asks again
            log.warning("project=%s webhook auth not queued: %s", project, exc)
    return jsonify({"model_version": _version_name(project)})


def _record_setup_error(project: int, body: Mapping[str, Any], message: str) -> None:
    """Keep a refused setup for `/status`, but only for a project this backend knows (no state for one
    never seen before) and only from a request that can be trusted: behind basic auth, or well-formed
    (a string schema with Label Studio's hostname and token). A round's error is kept apart."""
    services = _services()
    if project not in services.store.projects():
        return
    authenticated = bool(current_app.config["MAGRAL_CONFIG"].basic_auth_user)
    well_formed = isinstance(body.get("schema"), str) and all(
        isinstance(body.get(k), str) and body[k] for k in ("hostname", "access_token")
    )
    if authenticated or well_formed:
        services.store.record_error(project, message, stage="setup")


@blueprint.post("/predict")
def predict() -> ResponseReturnValue:
    body = _json_object()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, Mapping) for t in tasks):
        raise ApiError(400, f"expected 'tasks' to be a list of task objects, found {tasks!r:.80}")
    for task in tasks:
        if not isinstance(task.get("id"), int) or isinstance(task.get("id"), bool):
            raise ApiError(400, f"expected every task to have an integer 'id', found {task.get('id')!r}")
    if not tasks:
        return jsonify({"results": []})
    project = _project(body, tasks[0].get("project"))
    config = _label_config(project, body.get("label_config"))
    results = _services().predictor.predict(project, tasks, config)
    return jsonify({"results": results})


@blueprint.post("/webhook")
def webhook() -> ResponseReturnValue:
    event = parse_event(_json_object())
    services = _services()
    if event.kind == "ignored":
        return jsonify({"status": "ignored", "action": event.action, "reason": event.reason})
    if services.queue is None:
        raise ApiError(
            503, "expected a job queue (REDIS_URL or `magral serve`), found none: event not queued"
        )
    assert event.project is not None  # every non-ignored event names its project
    try:
        return _queue_event(services, event)
    except REDIS_DOWN as exc:
        log.warning("project=%s webhook %s not queued: %s", event.project, event.action, exc)
        raise ApiError(503, QUEUE_UNREACHABLE, action=event.action, project=event.project) from None


def _queue_event(services: Services, event: Any) -> Any:
    assert services.queue is not None and event.project is not None
    config = current_app.config["MAGRAL_CONFIG"]
    answer: dict[str, Any] = {"action": event.action, "project": event.project}
    if event.kind == "training":
        answer["status"] = services.queue.start_training(event.project).value
    elif event.kind == "annotations":
        decision = services.queue.annotations_changed(
            event.project, event.count, min_new=config.min_new_annotations
        )
        answer["status"] = decision.value
        answer["pending_annotations"] = services.queue.pending_annotations(event.project)
    else:
        if services.store.current_version(event.project) is None:
            answer["status"] = "ignored"
            answer["reason"] = "no trained version yet: the first round scores these tasks"
        else:
            services.queue.enqueue_scoring(event.project, event.task_ids)
            answer["status"] = "enqueued"
    if event.warnings:
        answer["warnings"] = list(event.warnings)
    log.info("project=%s webhook %s → %s", event.project, event.action, answer["status"])
    return jsonify(answer)


@blueprint.get("/versions")
def versions() -> ResponseReturnValue:
    store = _services().store
    raw = request.args.get("project")
    projects = [project_id(raw)] if raw is not None else store.projects()
    if None in projects:
        raise ApiError(400, f"expected ?project=<integer id>, found {raw!r}")
    names = [v for p in projects if p is not None for v in store.list_versions(p)]
    current = store.current_version(projects[0]) if raw is not None and projects[0] is not None else None
    return jsonify({"versions": names, "model_version": current or UNTRAINED})


def _cache() -> VersionCache:
    cache: VersionCache = current_app.extensions.setdefault("magral_version_cache", VersionCache())
    return cache


def _known_project(project: int) -> None:
    if project not in _services().store.projects():
        raise ApiError(404, f"expected a project this backend knows (see /status), found {project}")


def _wants_html() -> bool:
    """HTML only when asked for by ?format=html or an Accept header that prefers it to JSON (browsers)."""
    fmt = request.args.get("format")
    if fmt is not None:
        if fmt not in ("json", "html"):
            raise ApiError(400, f"expected ?format=json or ?format=html, found {fmt!r:.40}")
        return fmt == "html"
    accept = request.accept_mimetypes
    return accept["text/html"] > accept["application/json"]


@blueprint.get("/status")
def status() -> ResponseReturnValue:
    """JSON (`Accept: application/json`, `?format=json`, no Accept) or the dashboard (browsers)."""
    services = _services()
    config = current_app.config["MAGRAL_CONFIG"]
    raw = request.args.get("project")
    if raw is not None and project_id(raw) is None:
        raise ApiError(400, f"expected ?project=<integer id>, found {raw!r}")
    projects = (
        [p for p in [project_id(raw)] if p is not None] if raw is not None else services.store.projects()
    )
    html = _wants_html()
    rounds = {p: load_rounds(services.store, p) for p in projects}
    infos = [project_status(services, p, config, _cache(), rounds[p]) for p in projects]
    queue = queue_status(services)
    if not html:
        return jsonify({"projects": infos, "queue": queue})
    views = [
        dashboard.project_view(info, rounds[info["project"]], next_tasks(services, config, _cache(), info))
        for info in infos
    ]
    return dashboard.render(views, queue, refresh_s=STATUS_POLL_S)


@blueprint.get("/projects/<int:project>/ranking")
def task_ranking(project: int) -> ResponseReturnValue:
    """The served version's next tasks in serving order, with the signals behind their rank."""
    _known_project(project)
    try:
        limit = parse_limit(request.args.get("limit"))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    services = _services()
    current = services.store.current_version(project)
    if current is None:
        return jsonify({"project": project, "version": None, "total": 0, "tasks": []})
    info = {"project": project, "current_version": current}
    answer = next_tasks(services, current_app.config["MAGRAL_CONFIG"], _cache(), info, limit=limit)
    if answer is None:
        raise ApiError(404, f"project {project}: the served version has no ranking file")
    return jsonify(answer)


@blueprint.get("/projects/<int:project>/curve.png")
def curve(project: int) -> ResponseReturnValue:
    """The learning curve as a PNG, rendered once per served version and number of rounds."""
    _known_project(project)
    png = curve_png(_services(), current_app.config["MAGRAL_CONFIG"], _cache(), project)
    response = make_response(png)
    response.headers["Content-Type"] = "image/png"
    response.headers["Cache-Control"] = "private, max-age=60"
    return response
