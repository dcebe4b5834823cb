"""Rate limits per API key (per client address for requests without one), and limits on
the argon2 verifications a client address and a key id may cause, with ``limits``.

Requests: a moving window of ``api_rate_burst`` requests per ``round(burst / rate)`` seconds
(at least one): on average ``api_rate_per_second``, with up to ``api_rate_burst`` at once.

Verifications: a request whose key needs argon2 (one not verified in the last
``api_key_cache_seconds`` and never verified in this process) first counts one verification
against its client address (``api_verifications_per_minute``) and one against its key id
(``api_key_attempts_per_minute``, from any address). When either is spent, the request is
refused before the hash check, so a flood of wrong secrets is answered at once and costs
no CPU; the holder of the real key is not held back (endpoint.py lets a key that has passed
before through without counting it here).

A refused request gets 429 and ``Retry-After`` (whole seconds until the window lets one
through). All of this runs on the event loop, with no database read. Counters are in this
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
        self.item: RateLimitItem = RateLimitItemPerSecond(settings.api_rate_burst, window,
                                                          namespace="REQUESTS")
        self.verifications: RateLimitItem = RateLimitItemPerMinute(
            settings.api_verifications_per_minute, namespace="VERIFY_ADDRESS")
        self.key_attempts: RateLimitItem = RateLimitItemPerMinute(
            settings.api_key_attempts_per_minute, namespace="VERIFY_KEY_ID")
        self.storage = MemoryStorage()
        self.limiter = MovingWindowRateLimiter(self.storage)

    def check(self, who: str) -> None:
        """Count one request for ``who``; raise a 429 ApiError when over the limit."""
        if not self.limiter.hit(self.item, who):
            raise self._refusal(self.item, who, "rate limit exceeded; retry later", None)

    def check_verification(self, address: str, key_id: str) -> None:
        """Count one argon2 verification that ``address`` is about to cause for ``key_id``;
        raise a 429 ApiError, counting neither, when either has none left."""
        for item, who, whose in ((self.verifications, address, "from this address"),
                                 (self.key_attempts, key_id, "for this key id")):
            if not self.limiter.test(item, who):
                raise self._refusal(item, who, f"too many key checks {whose}; retry later",
                                    "Authorization")
        self.limiter.hit(self.verifications, address)
        self.limiter.hit(self.key_attempts, key_id)

    def _refusal(self, item: RateLimitItem, who: str, message: str,
                 field: str | None) -> ApiError:
        reset = self.limiter.get_window_stats(item, who).reset_time
        retry = max(1, math.ceil(reset - time.time()))
        return ApiError(429, message, field, {"Retry-After": str(retry)},
                        {"retry_after_seconds": retry})
