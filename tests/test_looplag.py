"""The event-loop lag monitor: a blocked loop shows as a stall of about the time it was
blocked, each window is summarised and logged, and the benchmark reads the windows back."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from appliance.errors import BranchguardError
from appliance.logs import JsonFormatter
from appliance.operations.looplag import EVENT, LagWindow, LoopLag, log_window, read_windows, \
    summarise, worst
from appliance.settings import load

from .support import wait_until

Node = type


def test_a_loop_blocked_for_50_ms_shows_a_stall_of_at_least_40_ms() -> None:
    async def scenario() -> tuple[LagWindow, LagWindow]:
        monitor = LoopLag(window_seconds=3600.0, on_window=lambda w: None)
        monitor.start()
        try:
            await asyncio.sleep(0.05)
            time.sleep(0.05)  # what a synchronous commit or a long parse does to the loop
            await asyncio.sleep(0.05)
            seen = monitor.take()
            emptied = monitor.take()  # nothing in between: the first take reset the window
        finally:
            monitor.stop()
        return seen, emptied

    seen, emptied = asyncio.run(scenario())
    assert seen.max_ms >= 40.0, seen
    assert seen.wakeups >= 2 and 0 <= seen.p99_ms <= seen.max_ms
    assert emptied.wakeups == 0 and emptied.max_ms == 0.0


def test_each_window_is_handed_over_as_it_ends() -> None:
    windows: list[LagWindow] = []

    async def scenario() -> None:
        monitor = LoopLag(window_seconds=0.1, on_window=windows.append)
        monitor.start()
        try:
            await asyncio.sleep(0.05)
            time.sleep(0.05)
            while len(windows) < 3:
                await asyncio.sleep(0.02)
        finally:
            monitor.stop()

    asyncio.run(scenario())
    assert max(w.max_ms for w in windows) >= 40.0
    assert all(w.wakeups > 0 and w.seconds >= 0.1 for w in windows)
    ends = [w.ended_at for w in windows]
    assert ends == sorted(ends) and abs(ends[-1] - time.time()) < 60  # epoch seconds


def test_summary_of_a_window() -> None:
    window = summarise([float(v) for v in range(1, 101)], ended_at=1000.0, seconds=1.0)
    assert window.wakeups == 100 and window.max_ms == 100.0
    assert 99.0 <= window.p99_ms <= 100.0
    assert summarise([], ended_at=1000.0, seconds=1.0).wakeups == 0


def test_logged_windows_are_read_back_and_the_worst_of_a_span_is_taken(tmp_path: Path) -> None:
    log_path = tmp_path / "scorer.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("appliance")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel("INFO")
    try:
        for end, peak, p99 in ((100.0, 3.0, 1.0), (101.0, 55.0, 2.0), (102.0, 4.0, 9.0),
                               (103.0, 80.0, 1.0)):
            log_window(LagWindow(ended_at=end, seconds=1.0, wakeups=190, max_ms=peak,
                                 p99_ms=p99))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        handler.close()
    with log_path.open("a") as f:  # other lines of the same log are skipped
        f.write('{"event": "node.ready", "level": "INFO"}\nnot json\n')
    assert EVENT in log_path.read_text()
    windows = read_windows(log_path)
    assert [w.max_ms for w in windows] == [3.0, 55.0, 4.0, 80.0]
    # the span 100.5-101.8 overlaps the windows ending at 101 and 102 (each 1 s long)
    assert worst(windows, 100.5, 101.8) == {"max_ms": 55.0, "p99_ms": 9.0, "windows": 2}
    assert worst(windows, 200.0, 300.0) == {"max_ms": None, "p99_ms": None, "windows": 0}


def test_the_node_logs_its_loop_lag_only_when_asked(tmp_path: Path, nats_url: str,
                                                    node_factory: Node) -> None:
    watched = node_factory(tmp_path / "watched", nats_url,
                           {"BRANCHGUARD_LOOP_LAG_WINDOW_SECONDS": "0.2"}).start()
    wait_until(lambda: len(read_windows(watched.log_path)) >= 2,
               message="loop.lag lines in the node's log")
    assert all(w.wakeups > 0 for w in read_windows(watched.log_path))
    assert watched.stop() == 0
    plain = node_factory(tmp_path / "plain", nats_url, {}).start()
    time.sleep(0.5)  # long enough for two windows, had it been on
    assert plain.stop() == 0
    assert read_windows(plain.log_path) == []


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(BranchguardError, match="loop_lag_window_seconds"):
        load(None, env={"BRANCHGUARD_LOOP_LAG_WINDOW_SECONDS": "-1"})
