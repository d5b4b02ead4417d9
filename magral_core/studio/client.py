"""The Label Studio REST calls MAGRAL makes, through `label-studio-sdk`, with errors turned into our own.

Authentication: the API key is a legacy token (`Authorization: Token <key>`) or a personal access token (a
JWT refresh token). The SDK exchanges a personal access token at `POST /api/token/refresh/` for an access
token (valid 300 s on Label Studio 1.23) and renews it before it expires (`Authorization: Bearer <access>`).
When Label Studio still answers 401 (a revoked access token, clock skew), the client drops the SDK client, so
the next call refreshes, and retries once.

Kept as one module because every call shares the SDK session, pagination and the translation of API errors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jwt
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.types import PredictionRequest

from magral_core.errors import MagralError, UserError
from magral_core.studio.downloads import DownloadCache, ImageFetchError

log = logging.getLogger(__name__)

T = TypeVar("T")

UNCERTAINTY_SAMPLING = "Uncertainty sampling"


class LabelStudioError(MagralError):
    """A Label Studio API call failed. `status` is the HTTP status (None: no answer), `body` a short excerpt
    of the answer; the message holds both, never a traceback."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


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
    `allowed_hosts` restricts image URLs outside Label Studio (None: any host; see
    `magral_core.studio.downloads`). `retries`: the SDK's retries of idempotent calls. Constructing makes
    no request. Raises UserError when `url` or
    `api_key` is empty, LabelStudioError when the personal access token has expired.
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
        allowed_hosts: Collection[str] | None = None,
        page_size: int = 100,
        predictions_per_request: int = 1000,
        retries: int = 2,
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
        self.page_size = page_size
        self.predictions_per_request = predictions_per_request
        self.retries = retries
        self._api_key = api_key.strip()
        self.uses_personal_access_token = is_personal_access_token(self._api_key)
        self.images = DownloadCache(
            Path(cache_dir),
            base_url=self.url,
            timeout=timeout,
            max_bytes=max_image_bytes,
            max_pixels=max_image_pixels,
            capacity_bytes=cache_bytes,
            allowed_hosts=allowed_hosts,
        )
        self._sdk: LabelStudio | None = None
        self._connect()

    # --- SDK plumbing ---------------------------------------------------------------------------------------
    def _connect(self) -> LabelStudio:
        try:
            # The SDK retries with backoff on 408/409/429/5xx and refused connections (not for imports).
            # The trailing slash keeps a path prefix (Label Studio under /ls/) in the SDK's token refresh,
            # which joins its URL with urljoin.
            self._sdk = LabelStudio(
                base_url=self.url + "/", api_key=self._api_key, timeout=self.timeout, max_retries=self.retries
            )
        except ApiError as exc:  # an expired personal access token is refused before any request
            raise self._error("connect", exc) from None
        return self._sdk

    @property
    def sdk(self) -> LabelStudio:
        """The SDK client (rebuilt after a 401 so that a personal access token is exchanged again)."""
        return self._sdk or self._connect()

    def _error(self, what: str, exc: Exception) -> LabelStudioError:
        if isinstance(exc, ApiError):
            body = short_body(exc.body)
            message = f"Label Studio {what} failed: HTTP {exc.status_code}: {body}"
            if exc.status_code == 401 and self.uses_personal_access_token:
                message += " (the API key is a personal access token: revoked, or from another Label Studio?)"
            elif exc.status_code == 401:
                message += (
                    " (the API key is a legacy token: wrong, or legacy tokens are disabled in the"
                    " organization, the default since Label Studio 1.23; a personal access token works there)"
                )
            return LabelStudioError(message, status=exc.status_code, body=body)
        if isinstance(exc, httpx.TimeoutException):
            return LabelStudioError(
                f"Label Studio {what} failed: no answer from {self.url} within {self.timeout:g} s"
            )
        if isinstance(exc, httpx.HTTPError):
            return LabelStudioError(
                f"Label Studio {what} failed: cannot reach {self.url} ({type(exc).__name__})"
            )
        return LabelStudioError(f"Label Studio {what} failed: unreadable answer ({type(exc).__name__})")

    def _call(self, what: str, call: Callable[[LabelStudio], T]) -> T:
        """Run one SDK call; after a 401 with a personal access token, reconnect and retry once."""
        try:
            return call(self.sdk)
        except (ApiError, httpx.HTTPError, json.JSONDecodeError) as exc:
            refused = isinstance(exc, ApiError) and exc.status_code == 401
            if not (refused and self.uses_personal_access_token):
                raise self._error(what, exc) from None
        log.info("label studio answered 401 to %s: exchanging the personal access token again", what)
        self._sdk = None
        try:
            return call(self.sdk)
        except (ApiError, httpx.HTTPError, json.JSONDecodeError) as exc:
            raise self._error(what, exc) from None

    def auth_headers(self) -> dict[str, str]:
        """The `Authorization` header the SDK sends (legacy token, or an access token it keeps fresh)."""
        # The SDK has no public accessor for it; its client wrapper is where it decides and refreshes.
        headers = self._call("token refresh", lambda sdk: sdk._client_wrapper.get_headers())
        return {"Authorization": headers["Authorization"]}

    # --- API ------------------------------------------------------------------------------------------------
    def get_project(self, project_id: int) -> Mapping[str, Any]:
        """The project's JSON (`label_config`, `model_version`, `sampling`, ...). Raises LabelStudioError."""
        project = self._call(f"get project {project_id}", lambda sdk: sdk.projects.get(id=project_id))
        return project.model_dump(mode="json")

    def list_tasks(self, project_id: int, *, image_key: str | None = None) -> list[LSTask]:
        """All tasks of a project with their annotations, page by page (`page_size` per request).

        `image_key`: the task-data key holding the image; default: read from the project's label config.
        Raises LabelStudioError (also for an unknown project).
        """
        if image_key is None:
            image_key = image_key_of(str(self.get_project(project_id).get("label_config") or ""))

        def fetch_all(sdk: LabelStudio) -> list[LSTask]:
            pager: Any = sdk.tasks.list(project=project_id, fields="all", page_size=self.page_size)
            # The SDK ends at the first empty page or at Label Studio's 404 "Invalid page." past the end.
            return [task_record(_as_dict(task), image_key) for task in pager]

        tasks = self._call(f"list tasks of project {project_id}", fetch_all)
        log.info("project=%s tasks=%d fetched", project_id, len(tasks))
        return tasks

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int:
        """Create predictions (`{"task", "result", "score", "model_version"}` each), `predictions_per_request`
        per request; return how many Label Studio created. Raises LabelStudioError when an answer's `created`
        count differs from what that request sent (earlier requests' predictions stay)."""
        created_total = 0
        step = max(1, self.predictions_per_request)
        for start in range(0, len(predictions), step):
            batch = [
                PredictionRequest(
                    task=int(p["task"]),
                    result=list(p.get("result") or ()),
                    score=None if p.get("score") is None else float(p["score"]),
                    model_version=None if p.get("model_version") is None else str(p["model_version"]),
                )
                for p in predictions[start : start + step]
            ]
            answer = self._call(
                f"import predictions into project {project_id}",
                # No automatic retry: a retried POST could create the batch twice.
                lambda sdk, batch=batch: sdk.projects.import_predictions(  # type: ignore[misc]
                    id=project_id, request=batch, request_options={"max_retries": 0}
                ),
            )
            created = answer.created
            if created != len(batch):
                raise LabelStudioError(
                    f"Label Studio import predictions into project {project_id}: expected {len(batch)} "
                    f"created, found {created} (tasks {batch[0].task}..{batch[-1].task}; "
                    f"{created_total} created before)"
                )
            created_total += created
        log.info("project=%s predictions=%d imported", project_id, created_total)
        return created_total

    def serve_in_ranked_order(self, project_id: int, model_version: str) -> None:
        """Make Label Studio serve tasks lowest prediction score first, among predictions of `model_version`
        (uncertainty sampling; the open-source server honours it when set through the API)."""
        self._call(
            f"update project {project_id}",
            lambda sdk: sdk.projects.update(
                id=project_id, sampling=UNCERTAINTY_SAMPLING, model_version=model_version
            ),
        )
        log.info("project=%s version=%s sampling=uncertainty", project_id, model_version)

    def add_webhook_header(self, project_id: int, backend_url_prefix: str, headers: Mapping[str, str]) -> int:
        """Add `headers` to the project's webhooks whose URL starts with `backend_url_prefix` (Label Studio
        sends no basic auth on the webhook it creates for an ML backend). Returns how many webhooks match."""
        prefix = backend_url_prefix.rstrip("/")
        hooks = self._call(
            f"list webhooks of project {project_id}", lambda sdk: sdk.webhooks.list(project=str(project_id))
        )
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

                self._call(f"update webhook {hook_id}", update)
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


def _as_dict(item: Any) -> Mapping[str, Any]:
    if isinstance(item, Mapping):
        return item
    return item.model_dump(mode="json")
