"""When a destination may be sent to next: exponential backoff with jitter after failures,
and a sliding-window rate limit. Both are per destination and in memory: after a restart a
destination is tried at once, which is what an operator who just fixed it wants."""

from __future__ import annotations

import random
from collections import deque


class Backoff:
    """Waits ``initial * 2**(failures-1)`` (capped at ``maximum``) plus random jitter of up
    to half that after each consecutive failure, so a recovering destination is not hit by
    every node at the same instant. A success resets it."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None
                 ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self.next_at = 0.0
        self._rng = rng or random.Random()

    def failed(self, now: float) -> float:
        """Record a failure at ``now``; returns the wait before the next attempt."""
        self.failures += 1
        wait = min(self.maximum, self.initial * 2.0 ** min(self.failures - 1, 60))
        wait += self._rng.uniform(0.0, wait / 2)
        self.next_at = now + wait
        return wait

    def succeeded(self) -> None:
        self.failures = 0
        self.next_at = 0.0


class RateLimit:
    """At most ``per_minute`` sends in any 60 seconds."""

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self._sent: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - 60.0:
            self._sent.popleft()

    def next_at(self, now: float) -> float:
        """The earliest time a send is allowed (``now`` if one is allowed now)."""
        self._trim(now)
        if len(self._sent) < self.per_minute:
            return now
        return self._sent[0] + 60.0

    def remaining(self, now: float) -> int:
        """Sends still allowed in the current 60 seconds."""
        self._trim(now)
        return max(0, int(self.per_minute) - len(self._sent))

    def record(self, now: float) -> None:
        self._sent.append(now)
