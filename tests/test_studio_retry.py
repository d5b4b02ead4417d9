"""Retry policy: known waits, bounds, and which failures count as passing outages."""

from __future__ import annotations

import random

import pytest

from magral_core.studio.retry import NO_RETRY, RetryPolicy, is_transient


def test_waits_double_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=6, backoff=0.5, max_backoff=3.0, jitter=0.0)
    assert list(policy.delays()) == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.worst_case_wait() == 9.5
    assert list(NO_RETRY.delays()) == []


def test_jitter_only_shortens() -> None:
    policy = RetryPolicy(attempts=5, backoff=1.0, max_backoff=4.0, jitter=0.2)
    for seed in range(20):
        waits = list(policy.delays(random.Random(seed)))
        assert all(0.8 * b <= w <= b for w, b in zip(waits, [1.0, 2.0, 4.0, 4.0], strict=True))


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"backoff": -1.0}, {"jitter": 1.0}])
def test_invalid_policies(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_transient_statuses() -> None:
    assert is_transient(None) and is_transient(503) and is_transient(429) and is_transient(502)
    assert not any(is_transient(s) for s in (400, 401, 403, 404, 409, 413, 501))
