"""Progress bars of the long commands (`magral train`, `magral simulate`, the benchmarks): tqdm on stderr.

A bar is drawn when stderr is a terminal, or when forced (`--progress`); `--no-progress` turns it off.
Redirected output (CI logs, `nohup`) gets no bar unless forced, so logs stay one line per event.
`StoreProgress` follows a simulation through the round files it leaves in its store, so the same bar
works whether the curves run in this process or in `--jobs` worker processes.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def add_progress_flags(parser: argparse.ArgumentParser) -> None:
    """`--progress` (draw bars even when stderr is not a terminal) and `--no-progress` (never)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help="progress bars on stderr even when it is not a terminal")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def progress_enabled(force: bool | None = None) -> bool:
    """`force` when given, else whether stderr is a terminal."""
    if force is not None:
        return force
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar(total: int | None = None, *, desc: str, unit: str = "it", enabled: bool | None = None,
        initial: int = 0) -> tqdm:
    """A tqdm bar on stderr (a no-op bar when disabled): update it with `.update(n)`, close it with `with`."""
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True,
                disable=not progress_enabled(enabled))


def track(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it",
          enabled: bool | None = None) -> Iterator[T]:
    """Iterate `items` with a bar of `total` steps (`len(items)` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total, desc=desc, unit=unit, enabled=enabled) as progress:
        for item in items:
            yield item
            progress.update(1)


class StoreProgress:
    """A bar over the round files a simulation writes: one step per (strategy, seed, round) found in its
    store, polled every `interval` seconds in a daemon thread. Use as a context manager around the run."""

    def __init__(self, paths: Sequence[tuple[str, Path]], *, enabled: bool | None = None,
                 interval: float = 2.0) -> None:
        """`paths`: (label, round file) per round of the run, e.g. ("magral seed 0 round 3", path)."""
        self._paths = list(paths)
        self._interval = interval
        self._stop = threading.Event()
        self._done = self._count()
        self._bar = bar(len(self._paths), desc="rounds", unit="round", enabled=enabled,
                        initial=len(self._done))
        self._thread = threading.Thread(target=self._poll, name="store-progress", daemon=True)

    def _count(self) -> set[int]:
        return {i for i, (_, path) in enumerate(self._paths) if path.is_file()}

    def refresh(self) -> None:
        """Count the round files now; the newest one found names the bar's postfix."""
        done = self._count()
        new = sorted(done - self._done)
        if new:
            self._bar.update(len(new))
            self._bar.set_postfix_str(self._paths[new[-1]][0], refresh=True)
            self._done = done

    @property
    def finished(self) -> int:
        """Rounds found so far."""
        return len(self._done)

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            self.refresh()

    def __enter__(self) -> StoreProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.refresh()
        self._bar.close()
