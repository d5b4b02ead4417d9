"""Atomic file writes: readers see the old file or the new one, never a part of either.

A temporary sibling is written, flushed to disk, then renamed over the target (`os.replace` is atomic within
one file system); on any error the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from magral_core.errors import StoreError


@contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "w", *, permissions: int = 0o644
) -> Iterator[IO[Any]]:
    """Open `path` for writing ("w" or "wb") through a temporary sibling, published on a clean exit.

    Creates missing parent directories; the published file gets `permissions`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', found {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, permissions)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str, *, permissions: int = 0o644) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_open(path, "w", permissions=permissions) as handle:
        handle.write(text)


def write_json(path: str | os.PathLike[str], data: Any, *, permissions: int = 0o644) -> None:
    """Write `data` as indented, key-sorted JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n", permissions=permissions)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; raises StoreError naming the file when it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"expected {path} to exist, found nothing") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
