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
    import numpy as np
    import torch

    # numpy warns about a zero subnormal if its float info is first read after flushing is on.
    np.finfo(np.float32), np.finfo(np.float64)
    torch.set_flush_denormal(True)
    # One thread unless told otherwise: tests share the machine with the servers the e2e tests start.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
