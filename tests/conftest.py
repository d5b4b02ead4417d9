"""Shared fixtures: where the real data lies, and torch set up for quick, deterministic tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BCCD = Path(os.environ.get("MAGRAL_BCCD", REPO.parent / "shared" / "data" / "bccd"))


@pytest.fixture(scope="session")
def bccd_root() -> Path:
    """The BCCD dataset beside the repository (../shared/data/bccd); tests that need it fail without it."""
    if not (BCCD / "annotations.json").is_file():
        pytest.fail(f"BCCD data not found at {BCCD}: expected ../shared/data/bccd or $MAGRAL_BCCD")
    return BCCD


@pytest.fixture(autouse=True, scope="session")
def _torch_setup() -> None:
    import torch

    torch.set_flush_denormal(True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
