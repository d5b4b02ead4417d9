"""Per-stage seconds from progress reports, with a fake clock."""

from __future__ import annotations

from magral_core.service.stage_clock import StageClock, merge_seconds


def test_time_is_charged_to_the_stage_that_was_running() -> None:
    now = [100.0]
    seen: list[tuple[str, float]] = []
    clock = StageClock(lambda stage, fraction: seen.append((stage, fraction)), clock=lambda: now[0])
    now[0] = 101.0  # before the first report: charged to no stage
    clock("fetching", 0.0)
    now[0] = 103.0
    clock("fetching", 0.5)  # same stage: nothing charged yet
    now[0] = 104.0
    clock("training", 0.0)
    now[0] = 110.0
    clock("fetching", 0.0)  # a stage that comes back adds up
    now[0] = 110.5
    assert clock.seconds() == {"fetching": 3.5, "training": 6.0}
    assert clock.started == 100.0 and [s for s, _ in seen] == ["fetching", "fetching", "training", "fetching"]


def test_a_clock_without_reports_has_no_stages() -> None:
    assert StageClock(lambda stage, fraction: None, clock=lambda: 5.0).seconds() == {}


def test_merge_adds_stages_of_several_jobs() -> None:
    assert merge_seconds({"a": 1.0, "b": 2.0}, {"b": 0.5}, {}) == {"a": 1.0, "b": 2.5}
