"""Bursts: alerts on the same terminal or the same account go out as one message.

A compromised terminal raising 200 alerts in a minute is one message with the count, not 200.
The first alert of a burst waits ``group_wait`` for the rest; after a message about a terminal
or account, further alerts about it wait ``group_interval`` and go out together. The times of
those last messages are in memory: after a restart the next message may come early, never
lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .messages import AlertView


def keys_of(alert: AlertView) -> tuple[str, str]:
    """The burst keys of an alert: its terminal (within its branch) and its account."""
    return (f"terminal:{alert.branch}/{alert.terminal_id}", f"account:{alert.account_id}")


@dataclass
class Burst:
    alerts: list[AlertView] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)

    @property
    def first_created(self) -> float:
        return min(a.created_at for a in self.alerts)


def bursts(alerts: Sequence[AlertView]) -> list[Burst]:
    """Group ``alerts`` (oldest first) so that each joins the burst already holding its
    terminal, else its account, else starts one. Bursts come out in order of their first
    alert."""
    by_key: dict[str, Burst] = {}
    out: list[Burst] = []
    for alert in alerts:
        keys = keys_of(alert)
        burst = by_key.get(keys[0]) or by_key.get(keys[1])
        if burst is None:
            burst = Burst()
            out.append(burst)
        burst.alerts.append(alert)
        for key in keys:
            burst.keys.add(key)
            by_key.setdefault(key, burst)
    return out


class Throttle:
    """When a burst may go out: ``group_wait`` after its first alert, and not sooner than
    ``group_interval`` after the last message about any of its keys."""

    def __init__(self, group_wait: float, group_interval: float) -> None:
        self.group_wait = group_wait
        self.group_interval = group_interval
        self._last: dict[str, float] = {}

    def sendable_at(self, burst: Burst) -> float:
        at = burst.first_created + self.group_wait
        for key in burst.keys:
            last = self._last.get(key)
            if last is not None:
                at = max(at, last + self.group_interval)
        return at

    def sent(self, burst: Burst, now: float) -> None:
        for key in burst.keys:
            self._last[key] = now
        if len(self._last) > 100_000:  # forget keys quiet for longer than the interval
            self._last = {k: t for k, t in self._last.items()
                          if t > now - self.group_interval}
