"""Throttling of failed console sign-ins, per username and per client address.

Each failed attempt is counted under two keys, ``user:<name>`` and ``addr:<address>``. When a
key reaches ``console_login_max_failures`` failures within ``console_login_window_minutes``,
it is locked for ``console_login_lockout_minutes``: every attempt on it is refused, even with
the right password, until the lock expires. A success clears only its own username's count
(never the address's, so one valid account cannot be used to wipe the count of an address
guessing at others, and never another user's).

The counts live in a diskcache directory under the node's data dir (SQLite underneath), so
every process serving the console shares them, and they survive a restart. Each update is a
read-modify-write inside ``cache.transact()``, so two processes failing at once both count.
Entries expire by themselves once neither the window nor the lock can still matter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import diskcache

from .. import logs
from ..settings import Settings

log = logs.get("appliance.login_throttle")
DIRECTORY = "login-throttle"


@dataclass(frozen=True)
class Lockout:
    """A refused attempt: which key is locked and until when (epoch seconds)."""

    key: str
    until: float

    def message(self, now: float) -> str:
        at = time.strftime("%H:%M:%S UTC", time.gmtime(self.until))
        minutes = max(1, round((self.until - now) / 60))
        return (f"too many failed sign-ins; try again after {at} "
                f"(in about {minutes} minute{'s' if minutes != 1 else ''})")


class LoginThrottle:
    """Failure counts and locks in ``directory`` (shared by every process that opens it)."""

    def __init__(self, directory: Path, max_failures: int, window_seconds: float,
                 lockout_seconds: float) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.cache = diskcache.Cache(str(directory))
        self.max_failures = max_failures
        self.window = window_seconds
        self.lockout = lockout_seconds

    @classmethod
    def of(cls, settings: Settings) -> LoginThrottle:
        return cls(settings.data_dir / DIRECTORY, settings.console_login_max_failures,
                   settings.console_login_window_minutes * 60,
                   settings.console_login_lockout_minutes * 60)

    @staticmethod
    def keys(username: str, address: str) -> tuple[str, str]:
        return f"user:{username.lower()}", f"addr:{address}"

    def locked(self, username: str, address: str, now: float | None = None) -> Lockout | None:
        """The lock that refuses an attempt for ``username`` from ``address``, or None.
        When both are locked, the one that lasts longer."""
        now = time.time() if now is None else now
        locks = []
        for key in self.keys(username, address):
            until = self._entry(key)[1]
            if until is not None and until > now:
                locks.append(Lockout(key, until))
        return max(locks, key=lambda lock: lock.until) if locks else None

    def failed(self, username: str, address: str, now: float | None = None) -> Lockout | None:
        """Count one failed attempt under both keys; returns the lock it started, if any."""
        now = time.time() if now is None else now
        started = []
        for key in self.keys(username, address):
            with self.cache.transact():
                failures, until = self._entry(key)
                failures = [t for t in failures if t > now - self.window] + [now]
                if len(failures) >= self.max_failures and (until is None or until <= now):
                    until = now + self.lockout
                    started.append(Lockout(key, until))
                    failures = []
                self.cache.set(key, (failures, until), expire=self.window + self.lockout)
        for lock in started:
            log.warning("console.login_locked", txn_id=None, key=lock.key, until=lock.until,
                        failures=self.max_failures, window_seconds=self.window)
        return max(started, key=lambda lock: lock.until) if started else None

    def succeeded(self, username: str) -> None:
        """Forget ``username``'s failures (its address's count stays; see module doc)."""
        self.cache.delete(self.keys(username, "")[0])

    def failures(self, username: str, address: str, now: float | None = None
                 ) -> tuple[int, int]:
        """Failures within the window so far, for (username, address)."""
        now = time.time() if now is None else now
        user_key, addr_key = self.keys(username, address)
        return (sum(1 for t in self._entry(user_key)[0] if t > now - self.window),
                sum(1 for t in self._entry(addr_key)[0] if t > now - self.window))

    def _entry(self, key: str) -> tuple[list[float], float | None]:
        value = self.cache.get(key)
        if not isinstance(value, tuple):
            return [], None
        failures, until = value
        return list(failures), until

    def close(self) -> None:
        self.cache.close()
