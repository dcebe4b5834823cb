"""How late the event loop is: a timer every few milliseconds that records how late it ran.

Everything the scorer does between two awaits (parsing a batch, a commit made on the loop,
a state rebuild) delays every other task on the loop: receiving, publishing verdicts, acks.
The lateness of a short timer is that delay, seen from outside the code that caused it, so
the largest one in a window is the longest the loop was stalled (less up to one interval: a
stall that begins just after a timer is set shows as its length minus the 5 ms).

``branchguard run`` starts it when ``loop_lag_window_seconds`` is above 0, and logs one
``loop.lag`` line per window. It costs a wake-up every 5 ms when the loop is otherwise idle:
measured here, 12–14 ms of CPU a second on a loaded machine (a plain ``asyncio.sleep`` loop
cost 17–23 ms), and almost nothing when the loop is busy, since the timer then runs within
iterations the loop makes anyway. ``branchguard bench`` reads those lines back (:func:`read_windows`) and takes the
worst window of each phase (:func:`worst`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import logs

log = logs.get("appliance.looplag")

INTERVAL_SECONDS = 0.005
"""How long each sleep asks for: a stall shorter than this can be missed."""
EVENT = "loop.lag"
"""The log event of one window."""


@dataclass(frozen=True)
class LagWindow:
    """The loop's lateness over one window. Times in milliseconds past the sleep's due time;
    ``ended_at`` in epoch seconds, so another process can match it with its own clock."""

    ended_at: float
    seconds: float
    wakeups: int
    max_ms: float
    p99_ms: float


def summarise(lags_ms: Sequence[float], ended_at: float, seconds: float) -> LagWindow:
    """One window's figures from its wake-ups' lateness (zeros when there were none)."""
    if not lags_ms:
        return LagWindow(ended_at, seconds, 0, 0.0, 0.0)
    return LagWindow(ended_at, round(seconds, 3), len(lags_ms), round(max(lags_ms), 3),
                     round(float(np.percentile(lags_ms, 99)), 3))


def log_window(window: LagWindow) -> None:
    """Log a window as one ``loop.lag`` line (INFO)."""
    log.info(EVENT, txn_id=None, **asdict(window))


class LoopLag:
    """The monitor: :meth:`start` it on the loop to watch; every ``window_seconds`` the
    window's :class:`LagWindow` goes to ``on_window`` (by default a log line). A plain timer
    callback rather than a task, so each tick costs no future and no task step."""

    def __init__(self, window_seconds: float,
                 on_window: Callable[[LagWindow], None] = log_window,
                 interval_seconds: float = INTERVAL_SECONDS) -> None:
        self.window_seconds = window_seconds
        self.interval_seconds = interval_seconds
        self.on_window = on_window
        self._lags: list[float] = []
        self._window_started = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        """Start watching the running loop (call from a coroutine on it)."""
        self._window_started = time.monotonic()
        self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        """Stop watching; the unfinished window is dropped."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def take(self) -> LagWindow:
        """The window so far, and start a new one."""
        now = time.monotonic()
        lags, self._lags = self._lags, []
        window = summarise(lags, time.time(), now - self._window_started)
        self._window_started = now
        return window

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.interval_seconds
        self._timer = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        # the loop may run a timer up to its clock resolution early: never below zero
        self._lags.append(max(0.0, loop.time() - self._due) * 1000.0)
        if time.monotonic() - self._window_started >= self.window_seconds:
            self.on_window(self.take())
        if self._timer is not None:  # not stopped by on_window
            self._schedule(loop)


def read_windows(path: Path) -> list[LagWindow]:
    """The ``loop.lag`` windows in a log file of JSON lines, in order; other lines skipped."""
    windows: list[LagWindow] = []
    with path.open(errors="replace") as f:
        for line in f:
            if EVENT not in line:
                continue
            try:
                fields = json.loads(line)
            except ValueError:
                continue
            if isinstance(fields, dict) and fields.get("event") == EVENT:
                windows.append(LagWindow(float(fields["ended_at"]), float(fields["seconds"]),
                                         int(fields["wakeups"]), float(fields["max_ms"]),
                                         float(fields["p99_ms"])))
    return windows


def worst(windows: Sequence[LagWindow], start: float, end: float
          ) -> dict[str, float | int | None]:
    """The largest stall and the worst window p99 (ms) among the windows that overlap
    ``start``..``end`` (epoch seconds), and how many there were; None without any."""
    inside = [w for w in windows if w.ended_at > start and w.ended_at - w.seconds < end]
    if not inside:
        return {"max_ms": None, "p99_ms": None, "windows": 0}
    return {"max_ms": max(w.max_ms for w in inside), "p99_ms": max(w.p99_ms for w in inside),
            "windows": len(inside)}
