"""Rate limits per API key (per client address for requests without one), with ``limits``.

A moving window of ``api_rate_burst`` requests per ``round(burst / rate)`` seconds (at least
one): on average ``api_rate_per_second``, with up to ``api_rate_burst`` at once. A refused
request gets 429 and ``Retry-After`` (whole seconds until the window lets one through).
Requests with a key count against the key once it is verified; requests without one, and
those whose key still needs an argon2 verification, count against the client address, which
may also cause at most ``api_verifications_per_minute`` argon2 verifications (each costs
tens of milliseconds of CPU, so they are what an attacker would send). Counters are in this
process's memory: the API runs as one process.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from ..settings import Settings
from .errors import ApiError


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        window = max(1, round(settings.api_rate_burst / settings.api_rate_per_second))
        self.item: RateLimitItem = RateLimitItemPerSecond(settings.api_rate_burst, window)
        self.verifications: RateLimitItem = RateLimitItemPerMinute(
            settings.api_verifications_per_minute)
        self.storage = MemoryStorage()
        self.limiter = MovingWindowRateLimiter(self.storage)

    def check(self, who: str) -> None:
        """Count one request for ``who``; raise a 429 ApiError when over the limit."""
        self._hit(self.item, who)

    def check_verification(self, address: str) -> None:
        """Count one argon2 verification caused by ``address`` (a tighter limit)."""
        self._hit(self.verifications, address)

    def _hit(self, item: RateLimitItem, who: str) -> None:
        if self.limiter.hit(item, who):
            return
        reset = self.limiter.get_window_stats(item, who).reset_time
        retry = max(1, math.ceil(reset - time.time()))
        raise ApiError(429, "rate limit exceeded; retry later", None,
                       {"Retry-After": str(retry)}, {"retry_after_seconds": retry})
