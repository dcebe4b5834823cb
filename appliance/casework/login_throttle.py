"""Throttling of failed console sign-ins, per (username, address).

Each failed attempt is counted under the pair of the username and the client's address.
When a pair reaches ``console_login_max_failures`` failures within
``console_login_window_minutes``, it is locked for ``console_login_lockout_minutes``: every
attempt for that username from that address is refused, even with the right password,
until the lock expires. The user can still sign in from another address, and everyone else
from that address (analysts behind one proxy or NAT share it), so neither someone who
mistypes nor an attacker guessing at a username can lock anyone else out. A success clears
only its own pair.

The counts live in a diskcache directory under the node's data dir (SQLite underneath), so
every process serving the console shares them, and they survive a restart (a restart is no
way round a lock). Each update is a read-modify-write inside ``cache.transact()``, so two
processes failing at once both count. Entries expire by themselves once neither the window
nor the lock can still matter. An operator ends a lock early with :func:`unlock`
(``branchguard users unlock``, audited); giving the demo user a fresh password does the same
for ``demo`` (runner.announce_demo_user), since the operator means it to work at once.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import diskcache
from sqlite_utils import Database

from .. import audit, logs
from ..change import apply_change
from ..settings import Settings
from .users import check_username

log = logs.get("appliance.login_throttle")
DIRECTORY = "login-throttle"
_PREFIX = "login:"


@dataclass(frozen=True)
class Lockout:
    """A refused attempt: which username, from which address, is locked until when (epoch
    seconds)."""

    username: str
    address: str
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
    def key(username: str, address: str) -> str:
        """The cache key of a pair (usernames are compared case-blind)."""
        return f"{_PREFIX}{username.lower()}|{address}"

    def locked(self, username: str, address: str, now: float | None = None) -> Lockout | None:
        """The lock that refuses ``username`` from ``address``, or None."""
        now = time.time() if now is None else now
        until = self._entry(self.key(username, address))[1]
        return Lockout(username, address, until) if until is not None and until > now else None

    def failed(self, username: str, address: str, now: float | None = None) -> Lockout | None:
        """Count one failed attempt of the pair; returns the lock it started, if any."""
        now = time.time() if now is None else now
        key = self.key(username, address)
        started = None
        with self.cache.transact():
            failures, until = self._entry(key)
            failures = [t for t in failures if t > now - self.window] + [now]
            if len(failures) >= self.max_failures and (until is None or until <= now):
                until = now + self.lockout
                started = Lockout(username, address, until)
                failures = []
            self.cache.set(key, (failures, until), expire=self.window + self.lockout)
        if started is not None:
            log.warning("console.login_locked", txn_id=None, user=username, address=address,
                        until=started.until, failures=self.max_failures,
                        window_seconds=self.window)
        return started

    def succeeded(self, username: str, address: str) -> None:
        """Forget the pair's failures (no other pair's; see module doc)."""
        self.cache.delete(self.key(username, address))

    def failures(self, username: str, address: str, now: float | None = None) -> int:
        """Failures of the pair within the window so far."""
        now = time.time() if now is None else now
        return sum(1 for t in self._entry(self.key(username, address))[0]
                   if t > now - self.window)

    def clear(self, username: str, address: str | None = None) -> list[str]:
        """Forget the counts and locks of ``username`` from ``address``, or from every
        address when None; returns the addresses that had any."""
        if address is not None:
            return [address] if self.cache.delete(self.key(username, address)) else []
        prefix = self.key(username, "")
        cleared = []
        for key in list(self.cache.iterkeys()):
            rest = key[len(prefix):] if isinstance(key, str) and key.startswith(prefix) else "|"
            if "|" not in rest and self.cache.delete(key):  # not another name's ("alice|x")
                cleared.append(rest)
        return cleared

    def _entry(self, key: str) -> tuple[list[float], float | None]:
        value = self.cache.get(key)
        if not isinstance(value, tuple):
            return [], None
        failures, until = value
        return list(failures), until

    def close(self) -> None:
        self.cache.close()


def unlock(settings: Settings, db: Database, username: str, address: str | None,
           actor: str) -> list[str]:
    """End ``username``'s sign-in locks (and forget its failures) from ``address``, or from
    every address when None; returns the addresses cleared. Audited as ``user.unlock`` when
    anything was cleared (clearing nothing changes nothing, so nothing is written)."""
    check_username(username.lower())
    throttle = LoginThrottle.of(settings)
    try:
        cleared = throttle.clear(username, address)
    finally:
        throttle.close()
    if cleared:
        def record(conn: sqlite3.Connection) -> None:
            audit.append(conn, actor, "user.unlock", f"user:{username.lower()}", None,
                         {"username": username.lower(), "addresses": sorted(cleared)})

        apply_change(db, record)
    log.info("console.login_unlocked", txn_id=None, user=username, address=address,
             addresses=sorted(cleared), actor=actor)
    return sorted(cleared)
