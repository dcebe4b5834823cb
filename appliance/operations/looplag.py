"""How late the event loop is: a task that sleeps a few milliseconds at a time and records
how late it woke up.

Everything the scorer does between two awaits (parsing a batch, a commit made on the loop,
a state rebuild) delays every other task on the loop: receiving, publishing verdicts, acks.
The lateness of a short sleep is that delay, seen from outside the code that caused it, so
the largest one in a window is the longest the loop was stalled.

``branchguard run`` starts it when ``loop_lag_window_seconds`` is above 0 (it costs a
wake-up every 5 ms, about half a percent of a core), and logs one ``loop.lag`` line per
window; ``branchguard bench`` reads those lines back (:func:`read_windows`) and takes the
worst window of each phase (:func:`worst`).
"""

from __future__ import annotations

import asyncio
import contextlib
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
    window's :class:`LagWindow` goes to ``on_window`` (by default a log line)."""

    def __init__(self, window_seconds: float,
                 on_window: Callable[[LagWindow], None] = log_window,
                 interval_seconds: float = INTERVAL_SECONDS) -> None:
        self.window_seconds = window_seconds
        self.interval_seconds = interval_seconds
        self.on_window = on_window
        self._lags: list[float] = []
        self._window_started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching the running loop (call from a coroutine on it)."""
        self._window_started = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        """Stop watching; the unfinished window is dropped."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def take(self) -> LagWindow:
        """The window so far, and start a new one."""
        now = time.monotonic()
        lags, self._lags = self._lags, []
        window = summarise(lags, time.time(), now - self._window_started)
        self._window_started = now
        return window

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_seconds
            await asyncio.sleep(self.interval_seconds)
            # the loop may run a timer up to its clock resolution early: never below zero
            self._lags.append(max(0.0, loop.time() - due) * 1000.0)
            if time.monotonic() - self._window_started >= self.window_seconds:
                self.on_window(self.take())


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
