"""When a Label Studio API call is tried again, and how long to wait before each try.

Only idempotent calls are retried (GETs, and PATCHes or DELETEs that set or remove a value): a POST that
creates something might have taken effect before its answer was lost, so trying it again could create it
twice. What counts as a passing outage: no answer at all (refused connection, timeout) or an answer that says
"try later" (408, 429, 500, 502, 503, 504). Any other answer (400, 401, 404, ...) is final.

Pure: the caller supplies the clock's `sleep`, so tests run without waiting.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

TRANSIENT_STATUSES: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts`: tries in all (1 = no retry); the wait before try k+1 (k = 1, 2, ...) is
    `min(backoff * 2**(k-1), max_backoff)` seconds, times a jitter factor in [1 - jitter, 1]."""

    attempts: int = 4
    backoff: float = 0.5
    max_backoff: float = 8.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, found {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"backoffs must be >= 0, found {self.backoff}, {self.max_backoff}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be within [0, 1), found {self.jitter}")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The `attempts - 1` waits in seconds, in order (bounded by `max_backoff` each)."""
        draw = (rng or random.Random()).random
        for k in range(self.attempts - 1):
            base = min(self.backoff * 2.0**k, self.max_backoff)
            yield base * (1.0 - self.jitter * draw())

    def worst_case_wait(self) -> float:
        """Upper bound of the total time spent waiting between tries (s), without the tries themselves."""
        return sum(min(self.backoff * 2.0**k, self.max_backoff) for k in range(self.attempts - 1))


NO_RETRY = RetryPolicy(attempts=1)


def is_transient(status: int | None) -> bool:
    """Whether a failure may pass: `status` None (no answer) or one of TRANSIENT_STATUSES."""
    return status is None or status in TRANSIENT_STATUSES
