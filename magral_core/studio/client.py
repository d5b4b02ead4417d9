"""The Label Studio REST calls MAGRAL makes, through `label-studio-sdk`, with errors turned into our own.

Authentication: the API key is a legacy token (`Authorization: Token <key>`) or a personal access token (a
JWT refresh token). The SDK exchanges a personal access token at `POST /api/token/refresh/` for an access
token (valid 300 s on Label Studio 1.23) and renews it before it expires (`Authorization: Bearer <access>`).
When Label Studio still answers 401 (a revoked access token, clock skew), the client drops the SDK client, so
the next call refreshes, and retries once.

Outages: idempotent calls (GET, and PATCH/DELETE that set or remove a value) are tried again with bounded
exponential backoff (`magral_core.studio.retry`); a POST that creates is not, except a prediction chunk, which
is re-sent once for the tasks that did not get their prediction. A call that still fails raises
LabelStudioError naming the call (method and path), the attempts and the last status or reason.

Memory at scale: tasks are read one page at a time and turned into records before the next page is asked
for; predictions are sent in chunks, each serialised once with `json.dumps` (the SDK's typed call would
copy every chunk through its recursive encoder first, ten times the CPU of the serialisation itself); old
predictions are deleted one model version per request, in Label Studio's database, with a timeout that
grows with the version's prediction count (`DELETE_SECONDS_PER_PREDICTION`).

Kept as one module because every call shares the SDK session, pagination and the translation of API errors.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import jwt
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from magral_core.errors import MagralError, UserError
from magral_core.studio.downloads import DownloadCache, ImageFetchError
from magral_core.studio.retry import NO_RETRY, RetryPolicy, is_transient
from magral_core.studio.url_policy import HostPolicy, parse_allowed_hosts

if TYPE_CHECKING:
    from magral_core.config import Config

log = logging.getLogger(__name__)

T = TypeVar("T")

UNCERTAINTY_SAMPLING = "Uncertainty sampling"
DELETE_SECONDS_PER_PREDICTION = 0.1
"""Seconds allowed per prediction for deleting a model version (at least the API timeout): Label Studio
1.23 deletes a version's predictions one at a time (a signal recounts and saves each one's task), about
40 per second on a busy 2-core machine, so 10,000 take minutes; a request cut short by the API timeout
would be sent again while the first still holds the database, and fail."""


class LabelStudioError(MagralError):
    """A Label Studio API call failed. `call` is "METHOD /path" ("" when not one request), `status` the last
    HTTP status (None: no answer), `body` a short excerpt of the answer, `attempts` how many tries were made;
    the message holds them all, never a traceback."""

    def __init__(
        self, message: str, *, status: int | None = None, body: str = "", call: str = "", attempts: int = 1
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.call = call
        self.attempts = attempts


class ShortImport(LabelStudioError):
    """Label Studio accepted a prediction chunk but created fewer predictions than it was sent."""


@dataclass(frozen=True)
class LSAnnotation:
    """One annotation of a task as Label Studio stores it (cancelled ones included: check `was_cancelled`)."""

    id: int
    result: tuple[Mapping[str, Any], ...]  # Label Studio result items as given (rectanglelabels etc.)
    was_cancelled: bool
    updated_at: str  # ISO 8601, for change detection


@dataclass(frozen=True)
class LSTask:
    """A task: `image` is `data[<image key of the label config>]` as stored ("" when the task has none)."""

    id: int
    image: str
    annotations: tuple[LSAnnotation, ...]
    data: Mapping[str, Any]


def is_personal_access_token(api_key: str) -> bool:
    """Whether the key is a personal access token (a JWT whose token_type is "refresh"), not a legacy token.
    The signature is not checked: Label Studio does that."""
    try:
        claims = jwt.decode(api_key, options={"verify_signature": False, "verify_exp": False})
    except jwt.InvalidTokenError:
        return False
    return claims.get("token_type") == "refresh"


def short_body(body: Any, limit: int = 200) -> str:
    """A one-line excerpt of an error answer: Label Studio's `detail` (+ `validation_errors`) when present."""
    if isinstance(body, Mapping) and "detail" in body:
        text = str(body["detail"])
        if body.get("validation_errors"):
            text += " " + json.dumps(body["validation_errors"], default=str)
    elif isinstance(body, str):
        text = body
    else:
        text = json.dumps(body, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def image_key_of(label_config: str) -> str | None:
    """The task-data key the label config's first Image reads (`value="$key"` → "key"), or None."""
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(label_config)
    except Exception:  # the SDK raises several XML/syntax error types for a broken config
        return None
    for obj in interface.objects:
        value = str(getattr(obj, "value", "") or "")
        if obj.tag == "Image" and value.startswith("$") and len(value) > 1:
            return value[1:]
    return None


def task_record(task: Mapping[str, Any], image_key: str | None) -> LSTask:
    """An `LSTask` from Label Studio's task JSON (`GET /api/tasks?fields=all` item)."""
    data = dict(task.get("data") or {})
    annotations = tuple(
        LSAnnotation(
            id=int(a["id"]),
            result=tuple(a.get("result") or ()),
            was_cancelled=bool(a.get("was_cancelled", False)),
            updated_at=str(a.get("updated_at") or a.get("created_at") or ""),
        )
        for a in (task.get("annotations") or ())
    )
    image = data.get(image_key, "") if image_key else ""
    return LSTask(id=int(task["id"]), image=str(image or ""), annotations=annotations, data=data)


class LabelStudioClient:
    """Label Studio's API for one backend: tasks, predictions, sampling, webhooks and task images.

    `timeout` (s) bounds each API call and each image download; `max_image_bytes` and `max_image_pixels`
    bound what an image may be; images are cached under `cache_dir` (at most `cache_bytes` in all).
    `allowed_hosts`: where task image URLs may lead beyond Label Studio (a HostPolicy or the text of
    MAGRAL_ALLOWED_IMAGE_HOSTS; default: nowhere; see `magral_core.studio.url_policy`). `page_size`: tasks
    per listing request; `predictions_per_request`: predictions per import request. `retry`: the tries and
    waits of idempotent calls; `sleep` waits (tests pass a recorder). Constructing makes no request. Raises
    UserError when `url` or `api_key` is empty, LabelStudioError when the personal access token has expired.
    """

    def __init__(
        self,
        *,
        url: str,
        api_key: str,
        cache_dir: Path,
        timeout: float,
        max_image_bytes: int,
        max_image_pixels: int,
        cache_bytes: int = 4 * 1024**3,
        allowed_hosts: HostPolicy | str | None = None,
        page_size: int = 100,
        predictions_per_request: int = 1000,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not url.strip():
            raise UserError(
                "expected the Label Studio URL (LABEL_STUDIO_URL, or the hostname Label Studio sends to "
                "/setup), found none"
            )
        if not api_key.strip():
            raise UserError(
                "expected a Label Studio API key (LABEL_STUDIO_API_KEY: a legacy token or a personal access "
                "token), found none"
            )
        self.url = url.strip().rstrip("/")
        self.timeout = timeout
        self.page_size = max(1, page_size)
        self.predictions_per_request = max(1, predictions_per_request)
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._api_key = api_key.strip()
        self.uses_personal_access_token = is_personal_access_token(self._api_key)
        policy = parse_allowed_hosts(allowed_hosts) if isinstance(allowed_hosts, str) else allowed_hosts
        self.images = DownloadCache(
            Path(cache_dir),
            base_url=self.url,
            timeout=timeout,
            max_bytes=max_image_bytes,
            max_pixels=max_image_pixels,
            capacity_bytes=cache_bytes,
            policy=policy,
        )
        self._sdk: LabelStudio | None = None
        self._connect()

    @classmethod
    def from_config(cls, config: Config, *, url: str = "", api_key: str = "") -> LabelStudioClient:
        """The client a config describes; `url`/`api_key` are used when the config has none (what `/setup`
        saw). Raises as the constructor does."""
        return cls(
            url=config.label_studio_url or url,
            api_key=config.label_studio_api_key or api_key,
            cache_dir=config.home / "images",
            timeout=config.download_timeout,
            max_image_bytes=config.max_image_bytes,
            max_image_pixels=config.max_image_pixels,
            cache_bytes=config.image_cache_bytes,
            allowed_hosts=parse_allowed_hosts(config.allowed_image_hosts),
            page_size=config.studio_page_size,
            predictions_per_request=config.prediction_chunk,
            retry=RetryPolicy(
                attempts=config.studio_attempts,
                backoff=config.studio_backoff,
                max_backoff=config.studio_max_backoff,
            ),
        )

    # --- SDK plumbing ---------------------------------------------------------------------------------------
    def _connect(self) -> LabelStudio:
        try:
            # Retries are ours (`_call`), so that only idempotent calls are tried again. The trailing slash
            # keeps a path prefix (Label Studio under /ls/) in the SDK's token refresh, which joins its URL
            # with urljoin.
            self._sdk = LabelStudio(
                base_url=self.url + "/", api_key=self._api_key, timeout=self.timeout, max_retries=0
            )
        except ApiError as exc:  # an expired personal access token is refused before any request
            raise self._error("POST", "/api/token/refresh/", exc, 1) from None
        return self._sdk

    @property
    def sdk(self) -> LabelStudio:
        """The SDK client (rebuilt after a 401 so that a personal access token is exchanged again)."""
        return self._sdk or self._connect()

    def _error(self, method: str, path: str, exc: Exception, attempts: int) -> LabelStudioError:
        call = f"{method} {path}"
        what = f"Label Studio {call} failed" + (f" after {attempts} attempts" if attempts > 1 else "")
        if isinstance(exc, ApiError):
            body = short_body(exc.body)
            message = f"{what}: HTTP {exc.status_code}: {body}"
            if exc.status_code == 401 and self.uses_personal_access_token:
                message += " (the API key is a personal access token: revoked, or from another Label Studio?)"
            elif exc.status_code == 401:
                message += (
                    " (the API key is a legacy token: wrong, or legacy tokens are disabled in the"
                    " organization, the default since Label Studio 1.23; a personal access token works there)"
                )
            return LabelStudioError(message, status=exc.status_code, body=body, call=call, attempts=attempts)
        if isinstance(exc, httpx.TimeoutException):
            message = f"{what}: no answer from {self.url} within {self.timeout:g} s"
        elif isinstance(exc, httpx.HTTPError):
            message = f"{what}: cannot reach {self.url} ({type(exc).__name__})"
        else:
            message = f"{what}: unreadable answer ({type(exc).__name__})"
        return LabelStudioError(message, call=call, attempts=attempts)

    def _call(self, method: str, path: str, call: Callable[[LabelStudio], T]) -> T:
        """Run one SDK call (`method path`, for retries and messages). Idempotent methods are tried again
        on a passing outage within `retry`; after a 401 with a personal access token, reconnect and try once
        more (refused requests did nothing). Raises LabelStudioError."""
        policy = self.retry if method in ("GET", "PATCH", "PUT", "DELETE") else NO_RETRY
        delays = policy.delays()
        attempts = 0
        refreshed = False
        while True:
            attempts += 1
            try:
                return call(self.sdk)
            except (ApiError, httpx.HTTPError, json.JSONDecodeError) as exc:
                status = exc.status_code if isinstance(exc, ApiError) else None
                if status == 401 and self.uses_personal_access_token and not refreshed:
                    log.info("label studio answered 401 to %s %s: exchanging the token again", method, path)
                    refreshed, self._sdk = True, None
                    continue
                wait = next(delays, None) if _is_outage(exc) else None
                if wait is None:
                    raise self._error(method, path, exc, attempts) from None
                log.warning("label studio %s %s failed (%s), attempt %d: again in %.2f s", method, path,
                            status or type(exc).__name__, attempts, wait)
                self._sleep(wait)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout: float | None = None,
    ) -> Any:
        """One API request through the SDK's HTTP client (auth and token refresh), for endpoints the SDK does
        not wrap or whose typed answers or encoder would copy every item; the parsed JSON answer (None when
        empty). `body` is serialised once, here (`json_body`); `timeout` (s) replaces the client's for this
        request."""
        content = None if body is None else json_body(body)
        options: dict[str, Any] = {"max_retries": 0}
        if timeout is not None:
            options["timeout_in_seconds"] = timeout

        def send(sdk: LabelStudio) -> Any:
            response = sdk._client_wrapper.httpx_client.request(
                path.lstrip("/"),
                method=method,
                params=dict(params or {}),
                content=content,
                headers=None if content is None else {"Content-Type": "application/json"},
                request_options=options,  # type: ignore[arg-type]
            )
            if not 200 <= response.status_code < 300:
                try:
                    answer: Any = response.json()
                except json.JSONDecodeError:
                    answer = response.text
                raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=answer)
            return response.json() if response.content else None

        return self._call(method, path, send)

    def auth_headers(self) -> dict[str, str]:
        """The `Authorization` header the SDK sends (legacy token, or an access token it keeps fresh)."""
        # The SDK has no public accessor for it; its client wrapper is where it decides and refreshes.
        headers = self._call("POST", "/api/token/refresh/", lambda sdk: sdk._client_wrapper.get_headers())
        return {"Authorization": headers["Authorization"]}

    # --- API ------------------------------------------------------------------------------------------------
    def get_project(self, project_id: int) -> Mapping[str, Any]:
        """The project's JSON (`label_config`, `model_version`, `sampling`, ...). Raises LabelStudioError."""
        project = self._call(
            "GET", f"/api/projects/{project_id}/", lambda sdk: sdk.projects.get(id=project_id)
        )
        return project.model_dump(mode="json")

    def iter_tasks(self, project_id: int, *, image_key: str | None = None) -> Iterator[LSTask]:
        """The tasks of a project with their annotations, one page (`page_size`) in memory at a time: each
        page's JSON becomes records before the next is asked for. A page that fails is tried again alone.

        `image_key`: the task-data key holding the image; default: read from the project's label config.
        Raises LabelStudioError (also for an unknown project).
        """
        if image_key is None:
            image_key = image_key_of(str(self.get_project(project_id).get("label_config") or ""))
        page, seen = 1, 0
        while True:
            answer = self._request(
                "GET",
                "/api/tasks/",
                params={"project": project_id, "fields": "all", "page": page, "page_size": self.page_size},
            )
            items = answer.get("tasks") or [] if isinstance(answer, Mapping) else []
            for item in items:
                yield task_record(item, image_key)
            seen += len(items)
            total = answer.get("total") if isinstance(answer, Mapping) else None
            del answer, items  # the page's JSON goes before the next page comes
            if seen == 0 or (isinstance(total, int) and seen >= total) or seen < page * self.page_size:
                return
            page += 1

    def list_tasks(self, project_id: int, *, image_key: str | None = None) -> list[LSTask]:
        """All tasks of a project (see `iter_tasks`), as a list. Raises LabelStudioError."""
        tasks = list(self.iter_tasks(project_id, image_key=image_key))
        log.info("project=%s tasks=%d fetched", project_id, len(tasks))
        return tasks

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int:
        """Create predictions (`{"task", "result", "score", "model_version"}` each, at most one per task and
        version), `predictions_per_request` per request; return how many Label Studio created.

        A chunk whose request fails or whose answer's `created` differs from what it sent is sent once more,
        for the tasks that have no prediction of that version yet (so nothing is created twice). Raises
        LabelStudioError when the second try fails too (earlier chunks' predictions stay).
        """
        created_total = 0
        step = self.predictions_per_request
        path = f"/api/projects/{project_id}/import/predictions"
        for start in range(0, len(predictions), step):
            chunk = [_prediction_request(p) for p in predictions[start : start + step]]
            try:
                created_total += self._send_chunk(project_id, path, chunk)
                continue
            except LabelStudioError as exc:
                if not isinstance(exc, ShortImport) and not is_transient(exc.status):
                    raise  # refused content (400: unknown task, ...): sending it again would not help
                log.warning(
                    "project=%s predictions of tasks %d..%d failed (%s): sending them once more",
                    project_id, chunk[0]["task"], chunk[-1]["task"], exc,
                )
            missing = self._without_prediction(project_id, chunk)
            created_total += len(chunk) - len(missing)
            if missing:
                created_total += self._send_chunk(project_id, path, missing, retried=True)
        log.info("project=%s predictions=%d imported", project_id, created_total)
        return created_total

    def _send_chunk(
        self, project_id: int, path: str, chunk: list[dict[str, Any]], *, retried: bool = False
    ) -> int:
        answer = self._request("POST", path, body=chunk)
        created = int(answer.get("created") or 0) if isinstance(answer, Mapping) else 0
        if created != len(chunk):
            again = " (sent a second time)" if retried else ""
            raise ShortImport(
                f"Label Studio POST {path}: expected {len(chunk)} created, found {created} (tasks "
                f"{chunk[0]['task']}..{chunk[-1]['task']}){again}",
                status=201,
                call=f"POST {path}",
            )
        return created

    def _without_prediction(self, project_id: int, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chunk's predictions whose task has no prediction of that model version in Label Studio yet."""
        ids = sorted({int(p["task"]) for p in chunk})
        query = json.dumps({"selectedItems": {"all": False, "included": ids}})
        answer = self._request(  # one page: the chunk's tasks only
            "GET",
            "/api/tasks/",
            params={"project": project_id, "fields": "all", "page": 1, "page_size": len(ids), "query": query},
        )
        have: set[tuple[int, str]] = set()
        for task in answer.get("tasks") or [] if isinstance(answer, Mapping) else []:
            for prediction in task.get("predictions") or ():
                if isinstance(prediction, Mapping):
                    have.add((int(task["id"]), str(prediction.get("model_version") or "")))
        return [p for p in chunk if (int(p["task"]), str(p["model_version"] or "")) not in have]

    def model_versions(self, project_id: int) -> dict[str, int]:
        """{model version: number of predictions} of the project, most recently created first (Label Studio's
        `/model-versions/`; predictions without a version under ""). Raises LabelStudioError."""
        answer = self._request("GET", f"/api/projects/{project_id}/model-versions/")
        if not isinstance(answer, Mapping):
            return {}
        return {("" if k in (None, "null") else str(k)): int(v or 0) for k, v in answer.items()}

    def delete_predictions(self, project_id: int, keep_versions: Collection[str]) -> int:
        """Delete every prediction of the project whose model version is not in `keep_versions`, one request
        per version (Label Studio deletes them in its database; nothing is listed here) allowed
        `DELETE_SECONDS_PER_PREDICTION` per prediction; return how many were deleted. Predictions without a
        version cannot be deleted this way and stay. Raises LabelStudioError.
        """
        keep = {str(v) for v in keep_versions}
        deleted = 0
        for version, count in self.model_versions(project_id).items():
            if version in keep or not version or count == 0:
                continue
            answer = self._request(
                "DELETE",
                f"/api/projects/{project_id}/model-versions/",
                body={"model_version": version},
                timeout=max(self.timeout, count * DELETE_SECONDS_PER_PREDICTION),
            )
            n = int(answer.get("deleted_predictions", 0)) if isinstance(answer, Mapping) else 0
            deleted += n
            log.info("project=%s version=%s predictions=%d deleted", project_id, version, n)
        return deleted

    def serve_in_ranked_order(self, project_id: int, model_version: str) -> None:
        """Make Label Studio serve tasks lowest prediction score first, among predictions of `model_version`
        (uncertainty sampling; the open-source server honours it when set through the API)."""
        self._call(
            "PATCH",
            f"/api/projects/{project_id}/",
            lambda sdk: sdk.projects.update(
                id=project_id, sampling=UNCERTAINTY_SAMPLING, model_version=model_version
            ),
        )
        log.info("project=%s version=%s sampling=uncertainty", project_id, model_version)

    def add_webhook_header(self, project_id: int, backend_url_prefix: str, headers: Mapping[str, str]) -> int:
        """Add `headers` to the project's webhooks whose URL starts with `backend_url_prefix` (Label Studio
        sends no basic auth on the webhook it creates for an ML backend). Returns how many webhooks match."""
        prefix = backend_url_prefix.rstrip("/")
        hooks = self._call("GET", "/api/webhooks/", lambda sdk: sdk.webhooks.list(project=str(project_id)))
        count = 0
        for hook in hooks:
            if hook.project != project_id or not str(hook.url).startswith(prefix) or hook.id is None:
                continue
            count += 1
            current = dict(hook.headers) if isinstance(hook.headers, Mapping) else {}
            merged = {**current, **headers}
            if merged != current:
                hook_id = hook.id

                def update(sdk: LabelStudio, i: int = hook_id, h: dict[str, str] = merged) -> Any:
                    return sdk.webhooks.update(id=i, headers=h)

                self._call("PATCH", f"/api/webhooks/{hook_id}/", update)
        log.info("project=%s webhooks=%d headers set", project_id, count)
        return count

    def fetch_image(self, image: str, *, task_id: int) -> Path:
        """Local, validated copy of a task image (see `DownloadCache.fetch` and the URL policy in
        `magral_core.studio.downloads`). Raises ImageFetchError; LabelStudioError for a refused key."""
        try:
            return self.images.fetch(image, task_id=task_id, auth_headers=self.auth_headers())
        except ImageFetchError as exc:
            if exc.status != 401 or not self.uses_personal_access_token:
                raise
        self._sdk = None  # a refused access token: exchange the personal access token again, once
        return self.images.fetch(image, task_id=task_id, auth_headers=self.auth_headers())


def _is_outage(exc: Exception) -> bool:
    """No answer, or an answer that says to try later (retry.TRANSIENT_STATUSES)."""
    if isinstance(exc, ApiError):
        return is_transient(exc.status_code)
    return isinstance(exc, httpx.TransportError)


def _prediction_request(p: Mapping[str, Any]) -> dict[str, Any]:
    """One prediction as `POST /api/projects/<id>/import/predictions` takes it."""
    return {
        "task": int(p["task"]),
        "result": list(p.get("result") or ()),
        "score": None if p.get("score") is None else float(p["score"]),
        "model_version": None if p.get("model_version") is None else str(p["model_version"]),
    }


def json_body(body: Any) -> bytes:
    """`body` as UTF-8 JSON; numpy values (anything with `tolist`) become numbers and lists. Raises
    TypeError for anything else JSON cannot hold."""

    def convert(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        raise TypeError(f"expected JSON-serialisable values, found {type(value).__name__}")

    return json.dumps(body, default=convert, separators=(",", ":")).encode()
