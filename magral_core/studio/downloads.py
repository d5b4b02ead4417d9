"""Task images on local disk: where a task's image URL points, and a size-capped cache of validated downloads.

URL policy (these are requests the backend makes on behalf of whoever can create tasks):

- `/data/upload/...`, `/data/local-files/?d=...` and absolute URLs on Label Studio's own origin are fetched
  with the API key's `Authorization` header;
- `s3://`, `gs://`, `azure-blob://` are resolved by Label Studio at `/tasks/{id}/presign/?fileuri=<base64>`
  (it redirects to a presigned URL or proxies the bytes), so storage credentials stay in Label Studio;
- any other `http(s)://` URL is fetched without credentials. Every host is allowed by default, as Label Studio
  itself displays such URLs; `allowed_hosts` (config `MAGRAL_ALLOWED_IMAGE_HOSTS`, see `parse_allowed_hosts`)
  restricts these requests, and every redirect hop of them, to Label Studio's origin plus the listed hosts;
- other schemes (`file:`, `data:`, ...) are refused.

Credentials never leave Label Studio's origin: a redirect elsewhere is followed without them.

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
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urljoin, urlsplit

import requests

from magral_core.datasets.images import image_size, read_image_rgb
from magral_core.errors import DataError, UserError

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_TMP_PREFIX = ".part-"
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}$")


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


def parse_allowed_hosts(value: str) -> tuple[str, ...] | None:
    """`MAGRAL_ALLOWED_IMAGE_HOSTS` → `allowed_hosts`: "*" = any host (None); "none" = Label Studio's origin
    only (empty tuple); otherwise comma-separated `host` or `host:port` entries."""
    text = value.strip().lower()
    if text == "*":
        return None
    if text == "none":
        return ()
    return tuple(h.strip() for h in text.split(",") if h.strip())


def host_allowed(url: str, allowed_hosts: Collection[str] | None, base_url: str) -> bool:
    """Whether an untrusted http(s) URL may be requested: any host when `allowed_hosts` is None, else Label
    Studio's own host or one listed (`host` or `host:port`, case-insensitive)."""
    if allowed_hosts is None:
        return True
    scheme, host, port = origin(url)
    if scheme not in ("http", "https"):
        return False
    if (scheme, host, port) == origin(base_url):
        return True
    allowed = {h.strip().lower() for h in allowed_hosts}
    return host in allowed or f"{host}:{port}" in allowed


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

    A cached file is complete and decodable (written to a temporary name, checked, then renamed). When the
    directory outgrows `capacity_bytes`, the least recently used files are deleted. Several processes may
    share the directory.
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
        allowed_hosts: Collection[str] | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.capacity_bytes = capacity_bytes
        self.allowed_hosts = None if allowed_hosts is None else tuple(allowed_hosts)
        self.session = session or requests.Session()
        self._used_bytes: int | None = None  # estimate, counted on the first write

    def fetch(self, image: str, *, task_id: int, auth_headers: Mapping[str, str]) -> Path:
        """Local path of a task image, downloaded when not cached.

        `auth_headers` are sent to Label Studio's origin only. Raises ImageFetchError (with `.status` set
        when an HTTP answer ended it) saying what was expected and what was found.
        """
        source = resolve_image(image, base_url=self.base_url, task_id=task_id)
        target = self.directory / cache_name(source.key)
        if target.is_file():
            with contextlib.suppress(OSError):  # a concurrent prune may have removed it; then download
                os.utime(target)  # recency for the LRU eviction
                return target
        if not source.trusted and not host_allowed(source.url, self.allowed_hosts, self.base_url):
            raise ImageFetchError(
                f"task {task_id}: image host of {source.url[:120]} is not allowed: expected Label Studio's "
                f"host or one of MAGRAL_ALLOWED_IMAGE_HOSTS ({', '.join(self.allowed_hosts or ()) or 'none'})"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.directory)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                content_type = self._download(source, task_id, auth_headers, out)
            self._validate(tmp, source.key, task_id, content_type)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        self._account(target.stat().st_size)
        return target

    def _download(
        self, source: ImageSource, task_id: int, auth_headers: Mapping[str, str], out: IO[bytes]
    ) -> str:
        """Stream the image into `out` within the byte and time limits; return its content type."""
        deadline = time.monotonic() + self.timeout
        url, trusted = source.url, source.trusted
        what = f"task {task_id}: image {source.key[:120]}"
        for _ in range(MAX_REDIRECTS + 1):
            on_studio = origin(url) == origin(self.base_url)
            headers = dict(auth_headers) if on_studio else {}
            try:
                response = self.session.get(
                    url,
                    headers=headers,
                    stream=True,
                    allow_redirects=False,
                    timeout=(self.timeout, self.timeout),
                )
            except requests.Timeout:
                raise ImageFetchError(
                    f"{what}: expected an answer within {self.timeout:g} s, found none"
                ) from None
            except requests.RequestException as exc:
                raise ImageFetchError(f"{what}: cannot connect ({type(exc).__name__})") from None
            with response:
                if response.is_redirect and response.headers.get("location"):
                    url = urljoin(url, response.headers["location"])
                    # A redirect from Label Studio (presign) is its decision; elsewhere the policy applies.
                    trusted = trusted and on_studio
                    if not trusted and not host_allowed(url, self.allowed_hosts, self.base_url):
                        raise ImageFetchError(
                            f"{what}: redirected to {url[:120]}, a host that is not allowed"
                        )
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

    def _validate(self, path: Path, key: str, task_id: int, content_type: str) -> None:
        what = f"task {task_id}: image {key[:120]}"
        try:
            width, height = image_size(path)
        except DataError:
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
