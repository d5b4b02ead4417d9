"""Atomic writes: the target is whole or untouched."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from magral_core.atomic import atomic_open, write_text_atomic


def test_writes_and_replaces_with_permissions(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.txt"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]


def test_error_leaves_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "c.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target, "wb") as handle:
        handle.write(b"partial")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.bin"]


def test_only_write_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be"), atomic_open(tmp_path / "x", "a"):
        pass
