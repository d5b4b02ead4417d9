"""Progress bars: on a terminal or when forced, never otherwise; the store bar counts round files."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import pytest

from magral_core.cli.progress import StoreProgress, add_progress_flags, bar, progress_enabled, track


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_follow_the_terminal_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_enabled()
    assert progress_enabled(True)
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert progress_enabled()
    assert not progress_enabled(False)


def test_flags() -> None:
    parser = argparse.ArgumentParser()
    add_progress_flags(parser)
    assert parser.parse_args([]).progress is None
    assert parser.parse_args(["--progress"]).progress is True
    assert parser.parse_args(["--no-progress"]).progress is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--progress", "--no-progress"])


def test_forced_bar_writes_to_stderr_and_a_disabled_one_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert list(track(range(3), desc="steps", enabled=False)) == [0, 1, 2]
    assert err.getvalue() == ""
    assert list(track(range(3), desc="steps", enabled=True)) == [0, 1, 2]
    assert "steps" in err.getvalue() and "3/3" in err.getvalue()


def test_store_progress_counts_round_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    paths = [(f"random seed 0 round {r}", tmp_path / f"round{r}.json") for r in range(3)]
    paths[0][1].write_text("{}")  # resumed: already stored
    with StoreProgress(paths, enabled=True, interval=60) as progress:
        assert progress.finished == 1
        paths[1][1].write_text("{}")
        progress.refresh()
        assert progress.finished == 2
        paths[2][1].write_text("{}")
    assert progress.finished == 3  # the last count is taken on exit
    assert "3/3" in err.getvalue() and "round 2" in err.getvalue()


def test_bar_disabled_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with bar(5, desc="x", enabled=None) as b:  # StringIO is not a terminal
        b.update(5)
    assert err.getvalue() == ""
