"""The scorer as ``branchguard run`` keeps it: one :class:`~appliance.scoring.pipeline.Scorer`
at a time on the node's NATS connection, and a fresh one each time that connection comes
back after a disconnect.

Why a fresh one: the scorer's pull requests die with the server, and so may deliveries that
were on their way; the durable consumer may also come back behind or ahead of what the
scorer has. Its ack policy is ``all``, so carrying on would let the next ack acknowledge a
message the scorer never saw. A new scorer does what a restart of the node does, which is
exact: it re-creates the consumer from the database checkpoint (delivery resumes in stream
order after the last committed batch), rebuilds the feature state from the committed rows,
and re-publishes the verdicts that may not have reached the stream. Nothing committed is
scored again, nothing uncommitted is lost. The old scorer is cancelled at once, as a crash
would end it: its commits are whole or absent (the writer thread finishes the one in hand).

A scorer that fails while NATS is away waits for it to come back; one that fails while
connected ends the node (crash-only, exit code 1), as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from typing import Any

from nats.aio.client import Client

from .. import logs
from ..scoring.ingest import DeliveryGap
from ..scoring.model import Model
from ..scoring.pipeline import Counters, Scorer
from ..scoring.registry import Registry
from ..settings import Settings
from ..store import Store

log = logs.get("appliance.runner")


CANCEL_SECONDS = 5.0
"""How long a cancelled scorer may take to commit what it holds and close."""


class ScorerRun:
    """Start the scorer, replace it after each reconnect, stop it."""

    def __init__(self, nc: Client, store: Store, model: Model, settings: Settings,
                 registry: Registry | None, reconnected: asyncio.Event) -> None:
        self.nc = nc
        self.store = store
        self.settings = settings
        self.registry = registry
        self.counters = Counters()
        """The running totals, kept across scorers (the status line reads them)."""
        self.reconnected = reconnected
        """Set by the connection's reconnect callback."""
        self.scorer = self._new(model)
        self.task: asyncio.Task[None] | None = None

    def _new(self, model: Model) -> Scorer:
        scorer = Scorer(self.nc, self.store, model, self.settings, self.registry)
        scorer.counters = self.counters
        return scorer

    @property
    def health(self) -> str:
        """What ``/readyz`` says of the scorer."""
        if not self.nc.is_connected:
            return "waiting for nats"
        if self.task is None or self.task.done():
            return "stopped"
        return "ok" if self.scorer.ready.is_set() else "starting"

    async def start(self) -> None:
        """Start the first scorer and return once it is ready; raise what stopped it."""
        self.task = asyncio.create_task(self.scorer.run())
        ready = asyncio.create_task(self.scorer.ready.wait())
        await asyncio.wait([self.task, ready], return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            ready.cancel()
            self.task.result()

    async def keep(self, stop: asyncio.Event) -> None:
        """Until ``stop``: a fresh scorer after each reconnect. Raises what stopped a scorer
        that failed while connected."""
        while not stop.is_set():
            waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait()),
                                              asyncio.ensure_future(self.reconnected.wait())}
            if self.task is not None and not self.task.done():
                waits.add(self.task)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                if waiting is not self.task:
                    waiting.cancel()
            if stop.is_set():
                return
            if self.reconnected.is_set():
                self.reconnected.clear()
                await self._replace("NATS reconnected")
            elif self.task is not None and self.task.done():
                error = None if self.task.cancelled() else self.task.exception()
                if isinstance(error, DeliveryGap):  # not a crash: start over, as on reconnect
                    await self._replace("a delivery went missing (consumer.gap)")
                    continue
                if self.nc.is_connected:
                    raise error or RuntimeError("the scorer stopped by itself")
                log.warning("scorer.stopped_while_disconnected", txn_id=None,
                            error=f"{type(error).__name__}: {error}" if error else None,
                            hint="a fresh scorer starts when NATS is back")
                self.task = None

    async def _replace(self, reason: str) -> None:
        old = self.scorer
        log.warning("scorer.restarting", txn_id=None, reason=reason,
                    hint="a fresh consumer from the database checkpoint; nothing committed "
                         "is scored again")
        await self._cancel()
        self.scorer = self._new(old.model)  # the model it had swapped to, if any
        self.task = asyncio.create_task(self.scorer.run())

    async def _cancel(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:  # its cleanup gets a few seconds, never a stop's whole time
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, CANCEL_SECONDS)

    async def stop(self, grace: float) -> BaseException | None:
        """Let the scorer finish the batch in hand and its acks for up to ``grace`` seconds
        (none while NATS is away: they could not be sent), then cancel it. Returns the error
        that ended it, if one did (logged here), never raises it: the node still has its
        children to stop."""
        self.scorer.stop()
        task = self.task
        if task is not None and not task.done() and self.nc.is_connected:
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(task), grace)
        if task is not None and not task.done():
            log.warning("scorer.stop_cancelled", txn_id=None, grace_seconds=grace,
                        connected=self.nc.is_connected)
            await self._cancel()
            return None
        error = None if task is None or task.cancelled() else task.exception()
        if error is not None:
            log.error("scorer.failed", txn_id=None,
                      error="".join(traceback.format_exception(error)).rstrip())
        return error
