"""Supervision of the node's children: one that exits while the node runs is logged with its
exit code and started again, after a backoff; and what is up or down is written for
``/readyz`` (:mod:`appliance.node_health`).

A child that exits is reaped at once (:meth:`Child.poll`), so none lingers as a zombie. The
first restart waits ``child_restart_initial_seconds``; each further exit of a child that
had not stayed up ``child_restart_max_seconds`` doubles the wait, up to that maximum, so a
child that cannot start (a port taken, a bad replica URL) is retried slowly rather than in
a tight loop, and one that crashed once after running for long comes back at once. A start
that fails counts as an exit. Restarts run on a thread (a start waits until the child
serves), so the scorer's event loop never waits for them.

The order of stopping is the runner's business; :meth:`Supervisor.close` only ends the
restarts, so nothing is started again while the node stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping

from .. import logs, node_health
from ..settings import Settings
from .child import Child, describe_exit

log = logs.get("appliance.supervisor")

CHECK_SECONDS = 0.1
"""How often the children are looked at: the most an exit waits to be noticed."""
HEALTH_SECONDS = 1.0
"""How often the health file is rewritten (see node_health.STALE_SECONDS)."""


class Supervisor:
    """Watches children (started by the runner, or by :meth:`launch`) and restarts them."""

    def __init__(self, settings: Settings,
                 parts: Callable[[], Mapping[str, str]] = dict) -> None:
        self.settings = settings
        self.parts = parts
        """The node's other parts for the health file (the scorer), name → state."""
        self.children: list[Child] = []
        self._bringing_up: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, int] = {}
        self._started_at: dict[str, float] = {}
        self._closing = asyncio.Event()

    def adopt(self, child: Child) -> None:
        """Watch a child the runner has started (and that is ready)."""
        self.children.append(child)
        self._started_at[child.name] = time.monotonic()

    def launch(self, child: Child) -> None:
        """Start ``child`` in the background and watch it; a failed start is retried like
        an exit, so a part the scorer does not need (the API, the dispatcher) never keeps
        the node from scoring."""
        self.children.append(child)
        self._bringing_up[child.name] = asyncio.create_task(self._bring_up(child, None))

    def states(self) -> dict[str, str]:
        """Each child: ``ok``, ``starting`` (never up yet) or ``restarting``."""
        out = {}
        for child in self.children:
            if child.name not in self._bringing_up:
                out[child.name] = node_health.OK
            else:
                out[child.name] = "restarting" if child.name in self._failures else "starting"
        return out

    async def watch(self) -> None:
        """Until :meth:`close`: notice exits, restart, keep the health file fresh."""
        written = 0.0
        try:
            while not self._closing.is_set():
                self.check()
                now = time.monotonic()
                if now - written >= HEALTH_SECONDS:  # a file write: off the event loop
                    await asyncio.get_running_loop().run_in_executor(None, self.write_health)
                    written = now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), CHECK_SECONDS)
        finally:
            node_health.remove(self.settings)

    def check(self) -> None:
        """Reap every child that has exited and start bringing it up again."""
        for child in self.children:
            if child.name in self._bringing_up or self._closing.is_set():
                continue
            pid = child.pid
            code = child.poll()
            if code is None:
                continue
            log.error("child.exited", txn_id=None, child=child.name, pid=pid, exit_code=code,
                      how=describe_exit(code),
                      ran_seconds=round(time.monotonic() - self._started_at[child.name], 1))
            self._bringing_up[child.name] = asyncio.create_task(
                self._bring_up(child, time.monotonic()))

    def write_health(self) -> None:
        node_health.write(self.settings, {**self.parts(), **self.states()})

    def _backoff(self, name: str) -> float:
        """Seconds before the next start of ``name``; counts this restart."""
        settings = self.settings
        if time.monotonic() - self._started_at.get(name, 0.0) >= \
                settings.child_restart_max_seconds:
            self._failures[name] = 0  # it had stayed up: this exit is a fresh one
        failures = self._failures.get(name, 0)
        self._failures[name] = failures + 1
        return float(min(settings.child_restart_max_seconds,
                         settings.child_restart_initial_seconds * 2 ** failures))

    async def _bring_up(self, child: Child, down_since: float | None) -> None:
        loop = asyncio.get_running_loop()
        first = down_since is None
        try:
            while not self._closing.is_set():
                if not first:
                    delay = self._backoff(child.name)
                    log.info("child.restarting", txn_id=None, child=child.name,
                             in_seconds=round(delay, 3))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), delay)
                    if self._closing.is_set():
                        return
                first = False
                self._started_at[child.name] = time.monotonic()
                try:
                    await loop.run_in_executor(None, child.start)
                except Exception as exc:  # noqa: BLE001 (any failure to start is retried)
                    log.error("child.start_failed", txn_id=None, child=child.name,
                              error=str(exc), hint=getattr(exc, "hint", None))
                    continue
                if down_since is not None:
                    log.warning("child.restarted", txn_id=None, child=child.name,
                                pid=child.pid,
                                seconds_down=round(time.monotonic() - down_since, 3))
                return
        finally:
            self._bringing_up.pop(child.name, None)

    async def close(self) -> None:
        """No more restarts: wait for a start in hand to finish (the runner stops the
        children next, in its own order)."""
        self._closing.set()
        pending = list(self._bringing_up.values())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
