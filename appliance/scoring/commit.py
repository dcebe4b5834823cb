"""Group commit: scored batches are written by one thread, in stream order, several at a time.

The event loop never waits on the disk. It hands each scored batch to :class:`GroupCommit`
and goes on pulling, scoring and publishing; the writer thread takes every batch waiting
(up to ``max_rows``, after at most ``max_wait`` seconds of gathering) and commits them in
one SQLite transaction, so a commit, its fsync-free WAL append and Litestream's write lock
are paid per group rather than per batch (2.7 → 1.4 WAL frames per transaction, issue 16).
Each batch's future resolves on the event loop when its group is durable.

A group that starts with a full pull batch (``busy_rows`` or more, which the scorer sets to
half its ``batch_size``: the stream has a backlog, more is on its way at once) gathers for
up to ``busy_wait`` instead. The transactions' indexes, the account index above all, take
their inserts in no order, so each row dirties about one index page whatever the group's
size; a larger group shares those pages between more rows. Storing 300,000 rows, groups of 500 wrote 1.08 WAL frames
a row and groups of 4,000 wrote 0.40 (``branchguard bench writer``, docs/benchmarks.md),
and every frame is copied again by the checkpoint and by Litestream. Small groups cost the
most: at 2,000 tx/s, groups of 40 rows (20 ms) wrote 2.2 frames a row and groups of 100
1.5, so even a quiet stream gathers for ``max_wait`` = 100 ms (at 2,000 tx/s, medians of 3
alternated runs: the scorer 197 against 218 µs of CPU a transaction, Litestream 12 against
20, p99 5.4 against 7.0 ms). Only acks wait for the commit; verdicts never do.

When Litestream takes the write lock for its checkpoint (up to half a second under load),
only this thread waits; verdicts keep flowing, and acks (which wait for the commit) are late.

With no Litestream to reset the WAL (``replicate = false``), the writer restarts it itself
every ``restart_wal_every`` seconds (``PRAGMA wal_checkpoint(RESTART)`` right after a
commit), so it cannot grow without bound: PASSIVE checkpoints alone never restart it while
a reader is always open.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass

from .. import logs
from ..errors import FencedError
from ..lease import Lease
from ..store import DeadLetter, Scored, Store

log = logs.get("appliance.commit")


@dataclass(slots=True)
class Pending:
    """One batch waiting for its commit."""

    scored: list[Scored]
    dead: list[DeadLetter]
    last_seq: int
    verdict_seq: int
    confirmed_seq: int
    done: asyncio.Future[int]


class GroupCommit:
    """The single writer thread of the node database (see the module docstring)."""

    def __init__(self, store: Store, consumer: str, max_rows: int = 4000,
                 max_wait: float = 0.1, restart_wal_every: float | None = None,
                 lease: Lease | None = None, busy_rows: int = 500,
                 busy_wait: float = 0.25) -> None:
        self.store = store
        self.consumer = consumer
        self.lease = lease
        """A partition's lease (issue 19): each commit first checks it is still held by the
        local clock, and carries its token, which the store compares with the last one."""
        self.max_rows = max_rows
        self.max_wait = max_wait
        self.busy_rows = busy_rows
        self.busy_wait = busy_wait
        self.restart_wal_every = restart_wal_every
        self.commits = 0
        self.batches = 0
        self._restarted_at = time.monotonic()
        self._queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def submit(self, scored: list[Scored], dead: list[DeadLetter], last_seq: int,
               verdict_seq: int, confirmed_seq: int) -> asyncio.Future[int]:
        """Queue a batch; the future gives the alerts it created once it is committed, or
        the error that stopped the writer (the node then stops: crash-only)."""
        if self._loop is None:
            raise RuntimeError("GroupCommit.start() first")
        done: asyncio.Future[int] = self._loop.create_future()
        self._queue.put(Pending(scored, dead, last_seq, verdict_seq, confirmed_seq, done))
        return done

    async def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    def _run(self) -> None:
        get = self._queue.get
        failed: BaseException | None = None
        while True:
            first = get()
            if first is None:
                return
            group, rows = [first], len(first.scored)
            deadline = time.monotonic() + (self.busy_wait if rows >= self.busy_rows
                                           else self.max_wait)
            ending = False
            while rows < self.max_rows:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    ending = True
                    break
                group.append(more)
                rows += len(more.scored)
            if failed is None:
                try:
                    created = self._commit(group)
                except FencedError as exc:  # the lease is lost: expected, and said once
                    log.warning("commit.fenced", txn_id=None, last_seq=group[-1].last_seq,
                                error=str(exc))
                    failed = exc
                except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                    log.error("commit.failed", exc_info=True, txn_id=None,
                              last_seq=group[-1].last_seq)
                    failed = exc
            for pending in group:
                self._resolve(pending, failed, created.get(id(pending), 0) if failed is None
                              else 0)
            if ending:
                return

    def _commit(self, group: list[Pending]) -> dict[int, int]:
        last = group[-1]
        lease, token = self.lease, None
        if lease is not None:
            if not lease.wait_held_blocking():  # a lapse (an election) is waited out
                raise FencedError("the partition's lease is no longer held", field="lease",
                                  value=lease.key, hint="another owner carries on from the "
                                  "checkpoint; nothing of this group is written")
            token = lease.token
        if len(group) == 1:
            created = self.store.save_batch(last.scored, last.dead, self.consumer,
                                            last.last_seq, last.verdict_seq,
                                            last.confirmed_seq, lease_token=token)
            counts = {id(last): created}
        else:
            scored = [s for p in group for s in p.scored]
            dead = [d for p in group for d in p.dead]
            created = self.store.save_batch(scored, dead, self.consumer, last.last_seq,
                                            max(p.verdict_seq for p in group),
                                            max(p.confirmed_seq for p in group),
                                            lease_token=token)
            counts = {id(last): created}  # alerts are counted per group, on its last batch
        self.commits += 1
        self.batches += len(group)
        if self.restart_wal_every is not None:
            self._restart_wal()
        return counts

    def _restart_wal(self) -> None:
        now = time.monotonic()
        if now - self._restarted_at < (self.restart_wal_every or 0.0):
            return
        self._restarted_at = now
        busy, pages, done = self.store.restart_wal()
        log.debug("wal.restarted", txn_id=None, busy=busy, pages=pages, checkpointed=done)

    def _resolve(self, pending: Pending, failed: BaseException | None, created: int) -> None:
        loop = self._loop
        if loop is None:
            return
        done = pending.done

        def settle() -> None:
            if done.done():
                return
            if failed is not None:
                done.set_exception(failed)
            else:
                done.set_result(created)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
