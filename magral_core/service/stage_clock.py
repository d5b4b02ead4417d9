"""Seconds spent per stage of a round, measured from the progress reports the round already makes.

A round reports `progress(stage, fraction)` as it goes (fetching, training, evaluating, scoring, ranking,
pushing, ...). `StageClock` passes each report on and charges the time since the previous report to the
stage that was running, so the per-stage seconds come for free wherever progress is reported. Wall-clock
time (`time.time`) rather than a monotonic clock, because one round spans several jobs and processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from magral_core.service.steps import Progress


class StageClock:
    """A progress callback that also times stages. `clock()` returns seconds (injectable for tests)."""

    def __init__(self, progress: Progress, *, clock: Callable[[], float] = time.time) -> None:
        self._progress = progress
        self._clock = clock
        self._stage: str | None = None
        self._since = clock()
        self.started = self._since
        self._seconds: dict[str, float] = {}

    def __call__(self, stage: str, fraction: float) -> None:
        if stage != self._stage:
            self._charge()
            self._stage = stage
        self._progress(stage, fraction)

    def _charge(self) -> None:
        now = self._clock()
        if self._stage is not None:
            self._seconds[self._stage] = self._seconds.get(self._stage, 0.0) + (now - self._since)
        self._since = now

    def seconds(self) -> dict[str, float]:
        """Seconds per stage so far, in the order the stages first ran (the running stage up to now)."""
        self._charge()
        return {stage: round(value, 3) for stage, value in self._seconds.items()}


def merge_seconds(*parts: Mapping[str, float]) -> dict[str, float]:
    """Per-stage seconds of several processes added up (a stage that ran in two jobs counts both)."""
    out: dict[str, float] = {}
    for part in parts:
        for stage, value in part.items():
            out[stage] = round(out.get(stage, 0.0) + float(value), 3)
    return out
