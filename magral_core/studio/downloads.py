"""Task images on local disk: where a task's image URL points, and a size-capped cache of validated downloads.

Where an image value leads (the host policy of every request is `magral_core.studio.url_policy`):

- `/data/upload/...`, `/data/local-files/?d=...` and absolute URLs on Label Studio's own origin are fetched
  with the API key's `Authorization` header;
- `s3://`, `gs://`, `azure-blob://` are resolved by Label Studio at `/tasks/{id}/presign/?fileuri=<base64>`
  (it redirects to a presigned URL or proxies the bytes), so storage credentials stay in Label Studio; the
  public hosts its redirects lead to are allowed;
- any other `http(s)://` URL is fetched without credentials when `MAGRAL_ALLOWED_IMAGE_HOSTS` allows its host
  (by default none beyond Label Studio);
- other schemes (`file:`, `data:`, ...) are refused.

Redirects are followed one hop at a time (at most MAX_REDIRECTS), each hop checked as a new request.
Credentials go only to Label Studio's origin, and only while every hop so far was there.

Kept as one module because URL resolution, the host policy and the size-bounded cache are the one path a task
image takes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

import requests
from PIL import Image

from magral_core.datasets.images import image_size, read_image_rgb
from magral_core.errors import DataError, UserError
from magral_core.studio.url_policy import (
    HostNotAllowed,
    HostPolicy,
    Studio,
    Target,
    check,
    guarded_session,
    guarding,
    resolve,
    target_of,
)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_TMP_PREFIX = ".part-"
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}$")
_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")


class ImageFetchError(UserError):
    """A task image that cannot be used: unreachable, missing, refused, too large, slow or not an image.

    `status` is the HTTP status that ended the download (None when no answer came)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageSource:
    """Where to download a task image from.

    `url`: first URL to request; `key`: what identifies the image (the cache key is its sha256);
    `trusted`: the URL came from Label Studio (its origin or its presign redirect), so no host policy applies.
    """

    url: str
    key: str
    trusted: bool


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL with the scheme's default port filled in; lower case."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def resolve_image(image: str, *, base_url: str, task_id: int) -> ImageSource:
    """Map a task's image value to the URL to fetch. Raises ImageFetchError for an unsupported value."""
    value = image.strip()
    base = base_url.rstrip("/")
    if not value:
        raise ImageFetchError(f"task {task_id}: expected an image URL in the task data, found an empty value")
    scheme = urlsplit(value).scheme.lower()
    if value.startswith("/") and not value.startswith("//"):
        url = base + value
        return ImageSource(url=url, key=url, trusted=True)
    if scheme in CLOUD_SCHEMES:
        encoded = base64.urlsafe_b64encode(value.encode()).decode()
        return ImageSource(url=f"{base}/tasks/{task_id}/presign/?fileuri={encoded}", key=value, trusted=True)
    if scheme in ("http", "https"):
        return ImageSource(url=value, key=value, trusted=origin(value) == origin(base))
    raise ImageFetchError(
        f"task {task_id}: expected an image URL that is /data/..., http(s)://, s3://, gs:// or "
        f"azure-blob://, found {value[:120]!r}"
    )


def cache_name(key: str) -> str:
    """File name of a cached image: sha256 of its key, plus the URL's extension when it has a short one."""
    path = urlsplit(key).path
    suffix = _SUFFIX.search(path)
    return hashlib.sha256(key.encode()).hexdigest() + (suffix.group(0).lower() if suffix else "")


def _excerpt(response: requests.Response, limit: int = 160) -> str:
    """The start of an error answer on one line, reading at most a few KiB of it."""
    head = b""
    with contextlib.suppress(requests.RequestException):
        for chunk in response.iter_content(1024):
            head += chunk
            if len(head) >= 4096:
                break
    flat = " ".join(head.decode("utf-8", errors="replace").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class DownloadCache:
    """Downloads task images into `directory`, validated; at most `max_bytes` each, `capacity_bytes` in all.

    `policy`: the hosts allowed beyond Label Studio (default: none). A cached file is complete and decodable
    (written to a temporary name, checked, then renamed). When the directory outgrows `capacity_bytes`, the
    least recently used files are deleted. Several processes may share the directory.
    """

    def __init__(
        self,
        directory: Path,
        *,
        base_url: str,
        timeout: float,
        max_bytes: int,
        max_pixels: int,
        capacity_bytes: int,
        policy: HostPolicy | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.capacity_bytes = capacity_bytes
        self.policy = policy or HostPolicy()
        self.session = guarded_session()
        self._used_bytes: int | None = None  # estimate, counted on the first write

    def fetch(self, image: str, *, task_id: int, auth_headers: Mapping[str, str]) -> Path:
        """Local path of a task image, downloaded when not cached.

        `auth_headers` are sent to Label Studio's origin only. Raises ImageFetchError (with `.status` set
        when an HTTP answer ended it) saying what was expected and what was found; a refused host's message
        names the host, its address and the setting that would allow it.
        """
        source = resolve_image(image, base_url=self.base_url, task_id=task_id)
        what = f"task {task_id}: image {source.key[:120]}"
        try:
            target_of(source.url)
        except HostNotAllowed as exc:
            raise ImageFetchError(f"{what}: {exc}") from None
        target = self.directory / cache_name(source.key)
        if target.is_file():
            with contextlib.suppress(OSError):  # a concurrent prune may have removed it; then download
                os.utime(target)  # recency for the LRU eviction
                return target
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.directory)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                content_type = self._download(source, what, auth_headers, out)
            self._validate(tmp, what, content_type)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        self._account(target.stat().st_size)
        return target

    def _studio(self) -> Studio:
        studio = target_of(self.base_url)
        try:
            addresses = resolve(studio.host, studio.port)
        except OSError:
            addresses = ()  # unresolvable: only its own origin counts as Label Studio
        return Studio(studio, addresses)

    def _vet(self, target: Target, studio: Studio, public_ok: bool) -> tuple[Any, ...]:
        """Resolve and check one request's target (url_policy.check); the addresses to connect to."""
        try:
            addresses = resolve(target.host, target.port)
        except OSError as exc:
            raise HostNotAllowed(f"cannot resolve host {target.host} ({exc})") from None
        check(target, addresses, self.policy, studio, public_ok=public_ok)
        return addresses

    def _download(
        self, source: ImageSource, what: str, auth_headers: Mapping[str, str], out: IO[bytes]
    ) -> str:
        """Stream the image into `out` within the byte and time limits; return its content type."""
        deadline = time.monotonic() + self.timeout
        studio = self._studio()
        url = source.url
        public_ok = source.trusted  # a chain Label Studio began may lead to public hosts (presigned URLs)
        credentials = True  # while every hop so far was on Label Studio's origin
        for hop in range(MAX_REDIRECTS + 1):
            try:
                target = target_of(url)
                self._vet(target, studio, public_ok)  # before the request, for a message naming the URL
            except HostNotAllowed as exc:
                prefix = f"{what}: " + (f"redirected to {url[:120]}: " if hop else "")
                raise ImageFetchError(prefix + str(exc)) from None
            on_studio = origin(url) == origin(self.base_url)
            credentials = credentials and on_studio
            headers = dict(auth_headers) if credentials else {}
            try:
                with guarding(lambda t, ok=public_ok: self._vet(t, studio, ok)):  # type: ignore[misc]
                    response = self.session.get(
                        url,
                        headers=headers,
                        stream=True,
                        allow_redirects=False,
                        timeout=(self.timeout, self.timeout),
                    )
            except HostNotAllowed as exc:  # the address changed between the check and the connection
                raise ImageFetchError(f"{what}: {exc}") from None
            except requests.Timeout:
                raise ImageFetchError(
                    f"{what}: expected an answer within {self.timeout:g} s, found none"
                ) from None
            except requests.RequestException as exc:
                raise ImageFetchError(f"{what}: cannot connect ({type(exc).__name__})") from None
            with response:
                if response.is_redirect and response.headers.get("location"):
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise ImageFetchError(
                        f"{what}: expected HTTP 200 with the image, found HTTP {response.status_code} "
                        f"({_excerpt(response)})",
                        status=response.status_code,
                    )
                self._stream(response, out, deadline, what)
                return str(response.headers.get("content-type", "unknown type"))
        raise ImageFetchError(f"{what}: expected at most {MAX_REDIRECTS} redirects, found more")

    def _stream(self, response: requests.Response, out: IO[bytes], deadline: float, what: str) -> None:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageFetchError(
                f"{what}: expected at most {self.max_bytes} bytes (MAGRAL_MAX_IMAGE_BYTES), "
                f"found Content-Length {declared}"
            )
        received = 0
        try:
            for chunk in response.iter_content(_CHUNK):
                received += len(chunk)
                if received > self.max_bytes:
                    raise ImageFetchError(
                        f"{what}: expected at most {self.max_bytes} bytes (MAGRAL_MAX_IMAGE_BYTES), "
                        f"found more"
                    )
                if time.monotonic() > deadline:
                    raise ImageFetchError(
                        f"{what}: expected the download to finish within {self.timeout:g} s "
                        f"(MAGRAL_DOWNLOAD_TIMEOUT), found {received} bytes after that"
                    )
                out.write(chunk)
        except requests.RequestException as exc:
            raise ImageFetchError(f"{what}: download interrupted ({type(exc).__name__})") from None

    def _validate(self, path: Path, what: str, content_type: str) -> None:
        try:
            width, height = image_size(path)
        except DataError as exc:
            bomb = _BOMB_PIXELS.search(str(exc.__cause__ or ""))
            if isinstance(exc.__cause__, Image.DecompressionBombError) and bomb:
                # PIL refuses to even read the header of an image this large; the limit is ours to name.
                raise ImageFetchError(
                    f"{what}: expected at most {self.max_pixels} pixels (MAGRAL_MAX_IMAGE_PIXELS), "
                    f"found {int(bomb.group(1))}"
                ) from None
            raise ImageFetchError(
                f"{what}: expected an image file, found {path.stat().st_size} bytes of {content_type} "
                f"that do not decode as an image"
            ) from None
        if width * height > self.max_pixels:
            raise ImageFetchError(
                f"{what}: expected at most {self.max_pixels} pixels (MAGRAL_MAX_IMAGE_PIXELS), "
                f"found {width}x{height}"
            )
        try:
            read_image_rgb(path, max_pixels=self.max_pixels)
        except DataError:
            raise ImageFetchError(
                f"{what}: expected a complete image, found a {width}x{height} {content_type} file that "
                f"does not decode (truncated or corrupt)"
            ) from None

    def _account(self, added: int) -> None:
        if self._used_bytes is None:
            self._used_bytes = sum(size for _, size, _ in self._entries())
        else:
            self._used_bytes += added
        if self._used_bytes > self.capacity_bytes:
            self.prune()

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for path in self.directory.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                continue
            with contextlib.suppress(OSError):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        return entries

    def prune(self) -> int:
        """Delete least recently used images until the cache holds at most 90% of its capacity; return the
        number of files deleted."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        deleted = 0
        for _, size, path in entries:
            if total <= 0.9 * self.capacity_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                deleted += 1
            total -= size
        self._used_bytes = total
        return deleted
