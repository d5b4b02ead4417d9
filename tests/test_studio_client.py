"""LabelStudioClient against a fake Label Studio (Flask in a thread) mimicking the endpoints the client
calls, with the shapes Label Studio 1.23.2 answers (pagination ending in 404 "Invalid page.", token
refresh, ...)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import pytest
from flask import Flask, Response, jsonify, redirect, request
from PIL import Image
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.serving import make_server

from magral_core.datasets.images import read_image_rgb
from magral_core.errors import UserError
from magral_core.studio import (
    ImageFetchError,
    LabelStudioClient,
    LabelStudioError,
    is_personal_access_token,
    parse_allowed_hosts,
)
from magral_core.studio.downloads import cache_name, resolve_image
from magral_core.studio.retry import RetryPolicy

# label-studio-sdk 2.1.2 refreshes tokens through pydantic's deprecated parse_obj.
pytestmark = pytest.mark.filterwarnings("ignore:The `parse_obj` method is deprecated:DeprecationWarning")

LEGACY = "0123456789abcdef0123456789abcdef01234567"
SECRET = "fake-signing-key-of-the-test-server-32b"
CONFIG = (
    '<View><Image name="image" value="$img"/><RectangleLabels name="label" toName="image">'
    '<Label value="RBC"/><Label value="WBC"/></RectangleLabels></View>'
)


def _jwt(token_type: str, lifetime: float) -> str:
    return jwt.encode(
        {"token_type": token_type, "exp": int(time.time() + lifetime)}, SECRET, algorithm="HS256"
    )


def _png(width: int = 8, height: int = 6) -> bytes:
    pixels = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@dataclass
class FakeStudio:
    """State of the fake server; tests read what it received and change what it answers."""

    tasks: list[dict[str, Any]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    created_shortfall: int = 0  # answer created = sent - shortfall
    import_status: int = 201
    access_tokens: set[str] = field(default_factory=set)
    refreshes: int = 0
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Authorization)
    patches: list[dict[str, Any]] = field(default_factory=list)
    imported: list[list[dict[str, Any]]] = field(default_factory=list)
    url: str = ""
    presign_to: str = ""  # origin the presign endpoint redirects to (default: its own)
    outages: dict[str, int] = field(default_factory=dict)  # "METHOD /path" → how many 503s to answer first
    import_drops: int = 0  # import requests that store their predictions but answer 502 (lost answers)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # {"id", "task", "model_version"}
    delete_seconds: float = 0.0  # how long deleting a model version takes
    content_types: list[str] = field(default_factory=list)  # of every prediction import

    def authorized(self) -> bool:
        header = request.headers.get("Authorization", "")
        return header == f"Token {LEGACY}" or (
            header.startswith("Bearer ") and header[len("Bearer ") :] in self.access_tokens
        )


def _denied() -> Response:
    response = jsonify({"status_code": 401, "detail": "Invalid token.", "exc_info": None})
    response.status_code = 401
    return response


def _app(studio: FakeStudio) -> Flask:
    app = Flask(__name__)

    @app.before_request
    def record() -> Response | None:
        studio.requests.append((request.method, request.full_path, request.headers.get("Authorization", "")))
        open_paths = ("/api/token/refresh/", "/external/")
        if not request.path.startswith(open_paths) and not studio.authorized():
            return _denied()
        key = f"{request.method} {request.path}"
        if studio.outages.get(key, 0) > 0:
            studio.outages[key] -= 1
            return Response("<html>503 Service Unavailable</html>", status=503)
        return None

    @app.post("/api/token/refresh/")
    def refresh() -> Any:
        token = (request.get_json() or {}).get("refresh", "")
        try:
            claims = jwt.decode(token, SECRET, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            return jsonify({"detail": "Token is invalid"}), 401
        if claims.get("token_type") != "refresh":
            return jsonify({"detail": "Token has wrong type"}), 401
        studio.refreshes += 1
        access = _jwt("access", 300 + studio.refreshes)  # unique per refresh
        studio.access_tokens.add(access)
        return jsonify({"access": access})

    @app.get("/api/projects/<int:pid>/")
    def project(pid: int) -> Any:
        if pid != 1:
            return jsonify({"status_code": 404, "detail": "No Project matches the given query."}), 404
        return jsonify({"id": 1, "title": "p", "label_config": CONFIG, "model_version": "", "sampling": "x"})

    @app.patch("/api/projects/<int:pid>/")
    def patch_project(pid: int) -> Any:
        studio.patches.append(request.get_json() or {})
        return jsonify({"id": pid, "label_config": CONFIG, **(request.get_json() or {})})

    @app.get("/api/tasks/")
    def tasks() -> Any:
        if request.args.get("project") != "1":
            return jsonify({"status_code": 404, "detail": "No Project matches the given query."}), 404
        page, size = int(request.args.get("page", 1)), int(request.args.get("page_size", 100))
        pool = studio.tasks
        if "query" in request.args:  # the data manager's selection, as Label Studio reads it
            included = set(json.loads(request.args["query"])["selectedItems"]["included"])
            pool = [t for t in studio.tasks if t["id"] in included]
        pool = [{**t, "predictions": [p for p in studio.predictions if p["task"] == t["id"]]} for t in pool]
        chunk = pool[(page - 1) * size : page * size]
        if page > 1 and not chunk:
            return jsonify({"status_code": 404, "detail": "Invalid page.", "exc_info": None}), 404
        return jsonify({"tasks": chunk, "total": len(pool), "total_annotations": 0, "total_predictions": 0})

    @app.post("/api/projects/<int:pid>/import/predictions")
    def import_predictions(pid: int) -> Any:
        studio.content_types.append(request.content_type or "")
        body = request.get_json() or []
        studio.imported.append(body)
        if studio.import_status != 201:
            return Response("<html><body>Server Error (500)</body></html>", status=studio.import_status)
        kept = body[: len(body) - studio.created_shortfall]
        for item in kept:
            number = len(studio.predictions) + 1
            studio.predictions.append(
                {"id": number, "task": item["task"], "model_version": item["model_version"]}
            )
        if studio.import_drops > 0:  # stored, but the answer is lost on the way
            studio.import_drops -= 1
            return Response("<html>502 Bad Gateway</html>", status=502)
        return jsonify({"created": len(kept)}), 201

    @app.get("/api/projects/<int:pid>/model-versions/")
    def model_versions(pid: int) -> Any:
        counts: dict[str, int] = {}
        for p in reversed(studio.predictions):  # most recently created first
            counts[p["model_version"]] = counts.get(p["model_version"], 0) + 1
        return jsonify(counts)

    @app.delete("/api/projects/<int:pid>/model-versions/")
    def delete_version(pid: int) -> Any:
        version = (request.get_json() or {}).get("model_version")
        if not version:
            return jsonify({"detail": "model_version param is required"}), 400
        before = len(studio.predictions)
        time.sleep(studio.delete_seconds)
        studio.predictions = [p for p in studio.predictions if p["model_version"] != version]
        return jsonify({"deleted_predictions": before - len(studio.predictions)})

    @app.get("/api/webhooks/")
    def webhooks() -> Any:
        return jsonify(studio.webhooks)

    @app.patch("/api/webhooks/<int:wid>/")
    def patch_webhook(wid: int) -> Any:
        hook = next(h for h in studio.webhooks if h["id"] == wid)
        hook.update(request.get_json() or {})
        return jsonify(hook)

    @app.get("/data/upload/1/<name>")
    def upload(name: str) -> Any:
        if name == "ok.png":
            return Response(_png(), mimetype="image/png")
        if name == "big.png":  # 40x30 = 1,200 pixels
            return Response(_png(40, 30), mimetype="image/png")
        if name == "text.png":
            return Response(b"<html>not an image</html>", mimetype="text/html")
        if name == "truncated.png":
            return Response(_png(30, 30)[:80], mimetype="image/png")
        if name == "huge.png":
            return Response(b"\0" * 5000, mimetype="image/png")
        if name == "chunked.png":  # no Content-Length: the limit is enforced while streaming
            return Response((b"\0" * 1000 for _ in range(5)), mimetype="image/png")
        if name == "slow.png":

            def drip() -> Iterator[bytes]:
                for _ in range(20):
                    time.sleep(0.1)
                    yield b"\0" * 10

            return Response(drip(), mimetype="image/png")
        return jsonify({"status_code": 404, "detail": "Not found."}), 404

    @app.get("/tasks/<int:tid>/presign/")
    def presign(tid: int) -> Any:
        uri = base64.urlsafe_b64decode(request.args["fileuri"]).decode()
        return redirect(
            f"{studio.presign_to or studio.url}/external/{uri.rsplit('/', 1)[-1]}?signature=abc", code=302
        )

    @app.get("/external/<name>")
    def external(name: str) -> Any:
        if name == "hop":
            return redirect(request.args["to"], code=302)
        return Response(_png(), mimetype="image/png")

    return app


@contextlib.contextmanager
def _serve(state: FakeStudio, prefix: str = "") -> Iterator[FakeStudio]:
    app: Any = _app(state)
    if prefix:  # Label Studio served under a path, behind a reverse proxy
        app = DispatcherMiddleware(Response("outside the prefix", status=404), {prefix: app})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    state.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        thread.join(timeout=5)


@pytest.fixture()
def studio() -> Iterator[FakeStudio]:
    with _serve(FakeStudio()) as state:
        yield state


@pytest.fixture()
def external() -> Iterator[str]:
    """A second origin (another port) serving /external/<name>: an image host that is not Label Studio."""
    with _serve(FakeStudio()) as state:
        yield state.url


def _client(studio: FakeStudio, tmp_path: Path, api_key: str = LEGACY, **kwargs: Any) -> LabelStudioClient:
    options: dict[str, Any] = {
        "timeout": 5.0,
        "max_image_bytes": 4000,
        "max_image_pixels": 1000,
        "sleep": lambda seconds: None,
    }
    options.update(kwargs)
    return LabelStudioClient(url=studio.url, api_key=api_key, cache_dir=tmp_path / "images", **options)


def _task(task_id: int, annotations: int = 0) -> dict[str, Any]:
    return {
        "id": task_id,
        "data": {"img": f"/data/upload/1/{task_id}.png"},
        "annotations": [
            {
                "id": 100 * task_id + k,
                "result": [{"type": "rectanglelabels", "value": {"x": 1, "rectanglelabels": ["RBC"]}}],
                "was_cancelled": k == 1,
                "updated_at": f"2026-01-0{k + 1}T00:00:00Z",
            }
            for k in range(annotations)
        ],
        "predictions": [],
    }


# --- pure helpers -----------------------------------------------------------------------------------------
def test_token_kind() -> None:
    assert is_personal_access_token(_jwt("refresh", 3600))
    assert is_personal_access_token(_jwt("refresh", -3600))  # expired is still a PAT (refused later)
    assert not is_personal_access_token(_jwt("access", 3600))
    assert not is_personal_access_token(LEGACY)


def test_resolve_image_and_policy() -> None:
    base = "http://ls:8080"
    upload = resolve_image("/data/upload/3/a.jpg", base_url=base + "/", task_id=1)
    assert (upload.url, upload.trusted) == ("http://ls:8080/data/upload/3/a.jpg", True)
    local = resolve_image("/data/local-files/?d=bccd/images/a.jpg", base_url=base, task_id=2)
    assert local.url == "http://ls:8080/data/local-files/?d=bccd/images/a.jpg" and local.trusted
    s3 = resolve_image("s3://bucket/x/y.png", base_url=base, task_id=7)
    assert s3.url == "http://ls:8080/tasks/7/presign/?fileuri=czM6Ly9idWNrZXQveC95LnBuZw=="
    assert s3.key == "s3://bucket/x/y.png" and s3.trusted
    assert resolve_image("http://LS:8080/data/upload/1/b.png", base_url=base, task_id=1).trusted
    assert not resolve_image("https://images.example.org/c.png", base_url=base, task_id=1).trusted
    for bad in ("", "file:///etc/passwd", "data:image/png;base64,AAAA", "relative/path.png"):
        with pytest.raises(ImageFetchError, match="expected an image URL"):
            resolve_image(bad, base_url=base, task_id=1)
    assert parse_allowed_hosts("*").any_public
    assert parse_allowed_hosts(" A.org, b.org:8000 ,").hosts == {"a.org", "b.org:8000"}
    assert cache_name("http://h/a/b.JPG?x=1").endswith(".jpg")
    assert len(cache_name("s3://b/noext")) == 64


def test_construction_needs_url_and_key(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="LABEL_STUDIO_URL"):
        LabelStudioClient(
            url="", api_key=LEGACY, cache_dir=tmp_path, timeout=1, max_image_bytes=1, max_image_pixels=1
        )
    with pytest.raises(UserError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioClient(
            url="http://x", api_key=" ", cache_dir=tmp_path, timeout=1, max_image_bytes=1, max_image_pixels=1
        )
    with pytest.raises(LabelStudioError, match="expired") as info:
        LabelStudioClient(
            url="http://x",
            api_key=_jwt("refresh", -60),
            cache_dir=tmp_path,
            timeout=1,
            max_image_bytes=1,
            max_image_pixels=1,
        )
    assert info.value.status == 401


# --- API --------------------------------------------------------------------------------------------------
def test_list_tasks_pages_through_all(studio: FakeStudio, tmp_path: Path) -> None:
    studio.tasks = [_task(i, annotations=2 if i == 3 else 0) for i in range(1, 8)]
    client = _client(studio, tmp_path, page_size=3)
    tasks = client.list_tasks(1)
    assert [t.id for t in tasks] == list(range(1, 8))
    assert tasks[0].image == "/data/upload/1/1.png"  # key "img" read from the label config
    assert [a.id for a in tasks[2].annotations] == [300, 301]
    assert [a.was_cancelled for a in tasks[2].annotations] == [False, True]
    assert tasks[2].annotations[1].updated_at == "2026-01-02T00:00:00Z"
    assert tasks[2].annotations[0].result[0]["value"]["rectanglelabels"] == ["RBC"]
    pages = [path for method, path, _ in studio.requests if path.startswith("/api/tasks/")]
    assert len(pages) == 3  # 3 + 3 + 1: the total says when to stop
    assert all("page_size=3" in p and "fields=all" in p for p in pages)
    assert all(auth == f"Token {LEGACY}" for _, _, auth in studio.requests)
    assert client.list_tasks(1, image_key="nothing")[0].image == ""


def test_unknown_project_and_unreachable_server(studio: FakeStudio, tmp_path: Path) -> None:
    client = _client(studio, tmp_path)
    with pytest.raises(LabelStudioError, match="HTTP 404: No Project matches") as info:
        client.get_project(2)
    assert info.value.status == 404
    with pytest.raises(LabelStudioError, match="HTTP 404"):
        client.list_tasks(2, image_key="img")
    dead = LabelStudioClient(
        url="http://127.0.0.1:9",
        api_key=LEGACY,
        cache_dir=tmp_path,
        timeout=1,
        max_image_bytes=1,
        max_image_pixels=1,
        retry=RetryPolicy(attempts=1),
    )
    with pytest.raises(LabelStudioError, match=r"cannot reach http://127.0.0.1:9") as refused:
        dead.get_project(1)
    assert "Traceback" not in str(refused.value)


def test_legacy_token_refused(studio: FakeStudio, tmp_path: Path) -> None:
    client = _client(studio, tmp_path, api_key="f" * 40)
    with pytest.raises(LabelStudioError, match=r"HTTP 401: Invalid token.*legacy token") as info:
        client.get_project(1)
    assert info.value.status == 401 and info.value.body == "Invalid token."
    assert len(studio.requests) == 1  # no refresh, no retry for a legacy token


def test_personal_access_token_refresh_and_refresh_on_401(studio: FakeStudio, tmp_path: Path) -> None:
    client = _client(studio, tmp_path, api_key=_jwt("refresh", 3600))
    assert client.uses_personal_access_token
    assert client.get_project(1)["label_config"] == CONFIG
    assert studio.refreshes == 1
    first = studio.requests[-1][2]
    assert first.startswith("Bearer ") and first[7:] in studio.access_tokens
    client.get_project(1)
    assert studio.refreshes == 1  # the access token is reused while valid
    studio.access_tokens.clear()  # revoked: the next call gets 401, refreshes, retries once
    assert client.get_project(1)["id"] == 1
    assert studio.refreshes == 2
    assert [r[0] for r in studio.requests].count("GET") == 4  # 2 ok + 401 + retry
    # Image downloads use the same access token, and refresh on 401 too.
    studio.access_tokens.clear()
    path = client.fetch_image("/data/upload/1/ok.png", task_id=1)
    assert read_image_rgb(path).shape == (6, 8, 3)
    assert studio.refreshes == 3


def test_personal_access_token_under_a_path_prefix(tmp_path: Path) -> None:
    with _serve(FakeStudio(), prefix="/ls") as studio:
        client = LabelStudioClient(
            url=studio.url + "/ls",
            api_key=_jwt("refresh", 3600),
            cache_dir=tmp_path,
            timeout=5,
            max_image_bytes=4000,
            max_image_pixels=1000,
        )
        assert client.get_project(1)["id"] == 1
        assert studio.refreshes == 1


def test_refresh_token_refused(studio: FakeStudio, tmp_path: Path) -> None:
    forged = jwt.encode(
        {"token_type": "refresh", "exp": int(time.time() + 60)}, SECRET[::-1], algorithm="HS256"
    )
    client = _client(studio, tmp_path, api_key=forged)
    with pytest.raises(LabelStudioError, match=r"HTTP 401: Token is invalid.*personal access token"):
        client.get_project(1)


def test_import_predictions_counts_and_chunks(studio: FakeStudio, tmp_path: Path) -> None:
    client = _client(studio, tmp_path, predictions_per_request=2)
    predictions = [
        {"task": i, "result": [{"type": "rectanglelabels"}], "score": i / 10, "model_version": "v2"}
        for i in range(1, 6)
    ]
    assert client.import_predictions(1, predictions) == 5
    assert [len(body) for body in studio.imported] == [2, 2, 1]
    assert studio.imported[0][1] == {
        "task": 2,
        "result": [{"type": "rectanglelabels"}],
        "score": 0.2,
        "model_version": "v2",
    }
    assert client.import_predictions(1, []) == 0
    assert len(studio.imported) == 3  # nothing sent for an empty list


def test_import_predictions_created_mismatch(studio: FakeStudio, tmp_path: Path) -> None:
    studio.created_shortfall = 1
    client = _client(studio, tmp_path)
    with pytest.raises(LabelStudioError, match="expected 3 created, found 2"):
        client.import_predictions(
            1, [{"task": i, "result": [], "score": 0.5, "model_version": "v"} for i in (1, 2, 3)]
        )


def test_import_predictions_server_error_is_resent_once_after_a_check(
    studio: FakeStudio, tmp_path: Path
) -> None:
    studio.import_status = 500
    studio.tasks = [_task(1)]
    client = _client(studio, tmp_path)
    with pytest.raises(LabelStudioError, match=r"HTTP 500: <html><body>Server Error \(500\)") as info:
        client.import_predictions(1, [{"task": 1, "result": [], "score": 0.5, "model_version": "v"}])
    assert info.value.status == 500
    # Sent twice, with a look at what the task already has in between (a blind retry could create twice).
    methods = [(m, path.split("?")[0]) for m, path, _ in studio.requests]
    post = ("POST", "/api/projects/1/import/predictions")
    assert methods == [post, ("GET", "/api/tasks/"), post]


def test_serve_in_ranked_order(studio: FakeStudio, tmp_path: Path) -> None:
    _client(studio, tmp_path).serve_in_ranked_order(1, "magral-v3")
    assert studio.patches == [{"sampling": "Uncertainty sampling", "model_version": "magral-v3"}]


def test_add_webhook_header(studio: FakeStudio, tmp_path: Path) -> None:
    studio.webhooks = [
        {"id": 1, "project": 1, "url": "http://backend:9090/webhook", "headers": {"X-Keep": "1"}},
        {"id": 2, "project": 1, "url": "http://elsewhere/hook", "headers": {}},
        {"id": 3, "project": 2, "url": "http://backend:9090/webhook", "headers": {}},
        {
            "id": 4,
            "project": 1,
            "url": "http://backend:9090/webhook",
            "headers": {"Authorization": "Basic x"},
        },
    ]
    client = _client(studio, tmp_path)
    assert client.add_webhook_header(1, "http://backend:9090/", {"Authorization": "Basic x"}) == 2
    assert studio.webhooks[0]["headers"] == {"X-Keep": "1", "Authorization": "Basic x"}
    assert studio.webhooks[1]["headers"] == {} and studio.webhooks[2]["headers"] == {}
    patched = [path for method, path, _ in studio.requests if method == "PATCH"]
    assert patched == ["/api/webhooks/1/?"]  # hook 4 already had it


# --- images -----------------------------------------------------------------------------------------------
def test_fetch_image_caches_validated_file(studio: FakeStudio, tmp_path: Path) -> None:
    client = _client(studio, tmp_path)
    path = client.fetch_image("/data/upload/1/ok.png", task_id=1)
    assert path.parent == tmp_path / "images" and path.suffix == ".png"
    np.testing.assert_array_equal(read_image_rgb(path), np.asarray(Image.open(io.BytesIO(_png()))))
    downloads = len(studio.requests)
    assert client.fetch_image("/data/upload/1/ok.png", task_id=1) == path
    assert len(studio.requests) == downloads  # served from the cache
    assert [p.name for p in (tmp_path / "images").iterdir()] == [path.name]  # no temporary files left


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.png", "expected HTTP 200 with the image, found HTTP 404 \\(.*Not found"),
        ("text.png", "expected an image file, found 25 bytes of text/html"),
        ("truncated.png", "expected a complete image, found a 30x30 image/png file that does not decode"),
        ("huge.png", "expected at most 4000 bytes \\(MAGRAL_MAX_IMAGE_BYTES\\), found Content-Length 5000"),
        ("chunked.png", "expected at most 4000 bytes \\(MAGRAL_MAX_IMAGE_BYTES\\), found more"),
        ("big.png", "expected at most 1000 pixels \\(MAGRAL_MAX_IMAGE_PIXELS\\), found 40x30"),
    ],
)
def test_fetch_image_refusals(studio: FakeStudio, tmp_path: Path, name: str, message: str) -> None:
    client = _client(studio, tmp_path)
    with pytest.raises(ImageFetchError, match=message) as info:
        client.fetch_image(f"/data/upload/1/{name}", task_id=4)
    assert str(info.value).startswith(f"task 4: image {studio.url}/data/upload/1/{name}")
    assert list((tmp_path / "images").iterdir()) == []  # nothing half-written stays


def test_fetch_image_timeout(studio: FakeStudio, tmp_path: Path) -> None:
    client = _client(studio, tmp_path, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"expected the download to finish within 0.5 s"):
        client.fetch_image("/data/upload/1/slow.png", task_id=1)
    assert time.monotonic() - started < 1.5


def test_fetch_image_cloud_uri_through_presign(studio: FakeStudio, tmp_path: Path, external: str) -> None:
    studio.presign_to = external
    # The storage host of this test is on loopback, so it must be named; a public one would not need to be
    # (see test_cloud_uri_presign_to_a_private_address_is_refused).
    client = _client(studio, tmp_path, allowed_hosts=f"127.0.0.1:{external.rsplit(':', 1)[1]}")
    path = client.fetch_image("s3://bucket/dir/ok.png", task_id=9)
    assert read_image_rgb(path).shape == (6, 8, 3)
    assert path.name == cache_name("s3://bucket/dir/ok.png")
    presign = [r for r in studio.requests if r[1].startswith("/tasks/9/presign/")]
    assert presign and presign[0][2] == f"Token {LEGACY}"
    assert not [r for r in studio.requests if r[1].startswith("/external/")]  # fetched from `external`


def test_fetch_image_foreign_hosts(studio: FakeStudio, tmp_path: Path, external: str) -> None:
    port = external.rsplit(":", 1)[1]
    default = _client(studio, tmp_path / "a")  # Label Studio only
    with pytest.raises(ImageFetchError, match=r"127.0.0.1, a loopback address.*MAGRAL_ALLOWED_IMAGE_HOSTS"):
        default.fetch_image(f"{external}/external/ok.png", task_id=1)
    public = _client(studio, tmp_path / "b", allowed_hosts="*")  # any public host: still not loopback
    with pytest.raises(ImageFetchError, match=r"loopback address"):
        public.fetch_image(f"{external}/external/ok.png", task_id=1)
    listed = _client(studio, tmp_path / "c", allowed_hosts=f"127.0.0.1:{port}")
    assert read_image_rgb(listed.fetch_image(f"{external}/external/ok.png", task_id=1)).shape == (6, 8, 3)
    hop = f"{external}/external/hop?to={external}/external/b.png"
    assert listed.fetch_image(hop, task_id=1).is_file()
    # An allowed address that redirects to another port of loopback, which is not allowed.
    with pytest.raises(ImageFetchError, match=r"redirected to http://localhost:9/.*localhost resolves to"):
        listed.fetch_image(f"{external}/external/hop?to=http://localhost:9/external/c.png", task_id=1)


def test_cache_evicts_least_recently_used(studio: FakeStudio, tmp_path: Path, external: str) -> None:
    size = len(_png())
    port = external.rsplit(":", 1)[1]
    client = _client(studio, tmp_path, cache_bytes=int(2.5 * size), allowed_hosts=f"127.0.0.1:{port}")
    first = client.fetch_image(f"{external}/external/a.png", task_id=1)
    second = client.fetch_image(f"{external}/external/b.png", task_id=2)
    old = time.time() - 100
    os.utime(first, (old, old))
    os.utime(second, (old + 1, old + 1))
    client.fetch_image(f"{external}/external/a.png", task_id=1)  # a hit refreshes its recency
    third = client.fetch_image(f"{external}/external/c.png", task_id=3)
    assert first.is_file() and third.is_file() and not second.exists()


def test_cloud_uri_presign_to_a_private_address_is_refused(
    studio: FakeStudio, tmp_path: Path, external: str
) -> None:
    """Label Studio's redirects may lead to public hosts only: a presign answer pointing at a loopback host
    (another port than Label Studio's) is refused unless allowed."""
    studio.presign_to = external
    with pytest.raises(ImageFetchError, match=r"redirected to http://127.0.0.1:\d+/external/.*loopback"):
        _client(studio, tmp_path / "a").fetch_image("s3://bucket/dir/ok.png", task_id=9)


# --- outages ----------------------------------------------------------------------------------------------
def test_idempotent_calls_retry_with_backoff(studio: FakeStudio, tmp_path: Path) -> None:
    waits: list[float] = []
    policy = RetryPolicy(attempts=4, backoff=0.5, max_backoff=1.0, jitter=0.0)
    client = _client(studio, tmp_path, retry=policy, sleep=waits.append)
    studio.outages = {"GET /api/projects/1/": 3}
    assert client.get_project(1)["id"] == 1
    assert waits == [0.5, 1.0, 1.0]  # doubled, capped at max_backoff
    studio.outages = {"PATCH /api/projects/1/": 2}
    client.serve_in_ranked_order(1, "v1")
    assert studio.patches == [{"sampling": "Uncertainty sampling", "model_version": "v1"}]
    studio.tasks = [_task(i) for i in range(1, 6)]
    studio.outages = {"GET /api/tasks/": 1}
    assert [t.id for t in client.list_tasks(1, image_key="img")] == [1, 2, 3, 4, 5]


def test_call_that_still_fails_names_the_call(studio: FakeStudio, tmp_path: Path) -> None:
    waits: list[float] = []
    client = _client(studio, tmp_path, retry=RetryPolicy(attempts=3, backoff=0.1), sleep=waits.append)
    studio.outages = {"GET /api/projects/1/": 10}
    with pytest.raises(LabelStudioError) as info:
        client.get_project(1)
    message = str(info.value)
    assert message.startswith("Label Studio GET /api/projects/1/ failed after 3 attempts: HTTP 503")
    assert (info.value.call, info.value.status, info.value.attempts) == ("GET /api/projects/1/", 503, 3)
    assert len(waits) == 2 and all(w <= 0.2 for w in waits)
    # 404 is an answer, not an outage: no retry.
    with pytest.raises(LabelStudioError, match=r"^Label Studio GET /api/projects/2/ failed: HTTP 404"):
        client.get_project(2)
    assert len(waits) == 2


def test_unreachable_server_is_retried_then_named(tmp_path: Path) -> None:
    waits: list[float] = []
    dead = LabelStudioClient(
        url="http://127.0.0.1:9",
        api_key=LEGACY,
        cache_dir=tmp_path,
        timeout=1,
        max_image_bytes=1,
        max_image_pixels=1,
        retry=RetryPolicy(attempts=2, backoff=0.01),
        sleep=waits.append,
    )
    with pytest.raises(LabelStudioError, match=r"PATCH /api/projects/1/ failed after 2 attempts: cannot"):
        dead.serve_in_ranked_order(1, "v")
    assert len(waits) == 1


def test_import_chunk_is_resent_once_without_duplicates(studio: FakeStudio, tmp_path: Path) -> None:
    studio.tasks = [_task(i) for i in range(1, 8)]
    client = _client(studio, tmp_path, predictions_per_request=3)
    predictions = [{"task": i, "result": [], "score": 0.5, "model_version": "v2"} for i in range(1, 8)]
    studio.import_drops = 1  # the first chunk is stored but its answer is lost: nothing to send again
    assert client.import_predictions(1, predictions) == 7
    assert [len(body) for body in studio.imported] == [3, 3, 1]
    assert sorted(p["task"] for p in studio.predictions) == list(range(1, 8))  # one each, no duplicate
    # A chunk Label Studio half-created is completed with the tasks it missed.
    studio.predictions.clear()
    studio.imported.clear()
    studio.created_shortfall = 1
    with pytest.raises(LabelStudioError, match=r"expected 1 created, found 0 .*sent a second time"):
        client.import_predictions(1, predictions[:3])
    assert [len(body) for body in studio.imported] == [3, 1]  # the retry sent only task 3
    studio.created_shortfall = 0
    studio.import_status = 400  # refused content is not sent again
    with pytest.raises(LabelStudioError):
        client.import_predictions(1, predictions[:1])
    assert len(studio.imported) == 3


def test_delete_predictions_keeps_versions(studio: FakeStudio, tmp_path: Path) -> None:
    studio.predictions = [
        {"id": i, "task": i % 4, "model_version": f"v{i // 4}"} for i in range(12)
    ]  # v0, v1, v2: 4 each
    client = _client(studio, tmp_path)
    assert client.model_versions(1) == {"v2": 4, "v1": 4, "v0": 4}
    studio.outages = {"DELETE /api/projects/1/model-versions/": 1}  # DELETE of a version is idempotent
    assert client.delete_predictions(1, keep_versions={"v2", "v1"}) == 4
    assert {p["model_version"] for p in studio.predictions} == {"v1", "v2"}
    assert client.delete_predictions(1, keep_versions={"v2", "v1"}) == 0
    deletes = [r for r in studio.requests if r[0] == "DELETE"]
    assert len(deletes) == 2  # one version, once retried; nothing listed prediction by prediction
    assert client.delete_predictions(1, keep_versions=()) == 8 and studio.predictions == []


def test_deleting_a_large_version_may_take_longer_than_the_api_timeout(
    studio: FakeStudio, tmp_path: Path
) -> None:
    """Label Studio deletes a version's predictions one at a time (minutes for 10,000): the request is given
    time for its count, not the API timeout, else a re-sent request collides with the running one."""
    from magral_core.studio.client import DELETE_SECONDS_PER_PREDICTION

    count = int(np.ceil(1.5 / DELETE_SECONDS_PER_PREDICTION))  # allowed at least 1.5 s
    studio.predictions = [{"id": i, "task": i, "model_version": "old"} for i in range(count)]
    studio.delete_seconds = 1.2
    client = _client(studio, tmp_path, timeout=0.5, retry=RetryPolicy(attempts=1))
    assert client.delete_predictions(1, keep_versions=()) == count
    assert studio.predictions == []
    with pytest.raises(LabelStudioError, match="no answer"):  # every other call keeps the API timeout
        studio.predictions = [{"id": 1, "task": 1, "model_version": "old"}]  # 1 prediction: 0.5 s allowed
        client.delete_predictions(1, keep_versions=())


def test_prediction_chunks_are_plain_json(studio: FakeStudio, tmp_path: Path) -> None:
    """Each chunk goes out as one JSON body (numpy numbers as JSON numbers), not through the SDK's encoder."""
    client = _client(studio, tmp_path)
    result = [{"type": "rectanglelabels", "value": {"x": np.float32(1.5), "rectanglelabels": ["RBC"]},
               "score": np.float64(0.25), "original_width": np.int64(640)}]
    assert client.import_predictions(1, [{"task": np.int64(3), "result": result, "score": np.float32(0.5),
                                          "model_version": "v"}]) == 1
    assert studio.content_types == ["application/json"]
    assert studio.imported == [[{"task": 3, "score": 0.5, "model_version": "v", "result": [
        {"type": "rectanglelabels", "value": {"x": 1.5, "rectanglelabels": ["RBC"]}, "score": 0.25,
         "original_width": 640}]}]]
    with pytest.raises(TypeError, match="JSON-serialisable values, found object"):
        client.import_predictions(1, [{"task": 1, "result": [{"value": object()}], "model_version": "v"}])


def test_image_over_the_pixel_limit_names_the_limit(studio: FakeStudio, tmp_path: Path) -> None:
    """A PNG whose header says 30000x30000: PIL refuses to open it (decompression bomb); the message names
    the limit instead of "does not decode"."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path = tmp_path / "huge.png"
    path.write_bytes(png + chunk(b"IEND", b""))
    cache = _client(studio, tmp_path, max_image_pixels=50_000_000).images
    limit = r"expected at most 50000000 pixels \(MAGRAL_MAX_IMAGE_PIXELS\), found 900000000"
    with pytest.raises(ImageFetchError, match=limit):
        cache._validate(path, "task 1: image x", "image/png")
