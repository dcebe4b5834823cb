"""Partition ownership by lease: at most one live owner per key of the ``BG_LEASES`` bucket.

A lease is a JetStream KV entry (key ``partition.<p>``) that names its owner. The bucket's
TTL (``lease_ttl_seconds``) removes an entry nobody renews, so a SIGKILLed owner's partition
is free again within about one TTL. Every write to a key is a compare-and-set on the key's
last revision (``Nats-Expected-Last-Subject-Sequence``), so:

- acquiring succeeds only on a free key (no entry, a delete or purge marker, or the marker
  the server leaves when an entry expires), and of several contenders exactly one wins;
- a renewal succeeds only while the owner's own last revision is still the key's last one:
  after an expiry or a takeover it is refused, the lease is lost at once and ``on_lost`` is
  called; the holder must stop writing;
- ``release()`` (a planned handoff) deletes the entry with the same check, so another owner
  takes the key at its next try, with no TTL to wait.

The fencing token is the revision (the stream sequence) of the write that acquired the
lease. Renewals keep it in the entry's value, so it stays the same for one tenure, and the
next owner's token is always larger (sequences only grow). A writer asks ``Lease.check()``
just before a commit: the bucket must still name its token, and its own clock must say the
lease has not run out. The token is stable for the whole tenure on purpose: a token that
changed at every renewal would fail a check that happened to straddle one.

Renewal runs in the lease's own asyncio task, which awaits nothing but the KV call: work
elsewhere (a restore, a rebuild) must run on worker threads or other tasks, and then never
delays it. If the event loop itself is blocked longer than the TTL (or the process is
stopped), the lease runs out locally as well: ``Lease.held`` turns false by the monotonic
clock, before any renewal has been answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import APIError, BucketNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from . import logs
from .errors import SettingsError
from .settings import Settings

log = logs.get("appliance.lease")

BUCKET = "BG_LEASES"
MARKER_TTL_SECONDS = 1.0
"""How long the server keeps the marker it writes when an entry expires (``limit_marker_ttl``):
watchers see the expiry; acquiring treats the marker as a free key."""

_KV_OP = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"
_WRONG_LAST_SEQUENCE = (10071, 10164)

OnLost = Callable[["Lease", str], None]
"""Called once, from the renewal task, when a lease is lost: with the lease and the reason
(``taken``: another owner holds the key now; ``expired``: the entry ran out, or no renewal
was answered within the TTL). It must not block: set a flag, cancel a task."""


def partition_key(partition: int) -> str:
    """The lease key of partition ``partition`` (0..N-1)."""
    if partition < 0:
        raise ValueError(f"partition must be >= 0, got {partition}")
    return f"partition.{partition}"


def owner_id() -> str:
    """``<host>:<pid>:<random>``: unique per process start, readable in the bucket."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Holder:
    """Who holds a key now, as the bucket says."""

    owner: str
    token: int
    """The revision that acquired the lease: the fencing token of this tenure."""
    revision: int
    """The key's last revision (the last renewal)."""


@dataclass(frozen=True)
class _Latest:
    revision: int
    holder: Holder | None  # None: a delete, purge or expiry marker, so the key is free


def _is_wrong_last(exc: APIError) -> bool:
    return isinstance(exc, KeyWrongLastSequenceError) or exc.err_code in _WRONG_LAST_SEQUENCE


class Leases:
    """The ``BG_LEASES`` bucket, seen by one owner (one process start).

    ``ttl_seconds`` and ``renew_seconds`` come from the settings; every owner sharing a
    bucket must use the same TTL (:meth:`open` refuses a bucket made with another one).
    """

    def __init__(self, js: JetStreamContext, kv: KeyValue, *, owner: str, ttl_seconds: float,
                 renew_seconds: float) -> None:
        self._js = js
        self._kv = kv
        self.owner = owner
        self.ttl_seconds = ttl_seconds
        self.renew_seconds = renew_seconds

    @classmethod
    async def open(cls, js: JetStreamContext, settings: Settings, *, replicas: int = 1,
                   owner: str | None = None) -> Leases:
        """Bind to ``BG_LEASES``, creating it if missing (``replicas``: 3 on a cluster, so the
        leases survive the loss of one server). ``owner`` defaults to :func:`owner_id`."""
        ttl = settings.lease_ttl_seconds
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(KeyValueConfig(
                bucket=BUCKET, history=1, ttl=ttl, replicas=replicas,
                limit_marker_ttl=MARKER_TTL_SECONDS,
                description="Branchguard partition leases (appliance/lease.py)"))
        status = await kv.status()
        if status.ttl is None or abs(status.ttl - ttl) > 1e-3:
            raise SettingsError(
                "the lease bucket was made with another TTL", field="lease_ttl_seconds",
                value=ttl, hint=f"{BUCKET} expires entries after {status.ttl} s: use that, or "
                "delete the bucket while no scorer runs (every scorer must agree)")
        return cls(js, kv, owner=owner or owner_id(), ttl_seconds=ttl,
                   renew_seconds=settings.lease_renew_seconds)

    async def holder(self, key: str) -> Holder | None:
        """Who holds ``key`` now, or None if it is free."""
        latest = await self._latest(key)
        return latest.holder if latest else None

    async def holders(self, prefix: str) -> dict[str, Holder]:
        """Every key under ``prefix`` (``member.``, ``partition.``) that someone holds now: one
        stream info for the keys the bucket has, then each key's last message (a key whose
        entry expired or was released shows its marker, and is left out)."""
        stream = f"KV_{BUCKET}"
        info = await self._js.stream_info(stream, subjects_filter=f"$KV.{BUCKET}.{prefix}>")
        keys = [subject.removeprefix(f"$KV.{BUCKET}.") for subject in info.state.subjects or {}]
        found: dict[str, Holder] = {}
        for key in sorted(keys):
            latest = await self._latest(key)
            if latest is not None and latest.holder is not None:
                found[key] = latest.holder
        return found

    async def check(self, key: str, token: int) -> bool:
        """Whether the bucket still names ``token`` as the tenure holding ``key``: a writer's
        fencing check just before it commits (:meth:`Lease.check` adds the local clock)."""
        holder = await self.holder(key)
        return holder is not None and holder.token == token

    async def acquire(self, key: str, on_lost: OnLost | None = None) -> Lease | None:
        """One try: the lease on ``key`` if it is free (and nobody beat us to it), else None.
        The returned lease renews itself until it is released or lost."""
        latest = await self._latest(key)
        if latest is not None and latest.holder is not None:
            return None
        sent = time.monotonic()
        try:
            revision = await self._kv.update(key, _value(self.owner, None),
                                             last=latest.revision if latest else 0)
        except APIError as exc:
            if _is_wrong_last(exc):
                return None
            raise
        lease = Lease(self, key, revision, sent + self.ttl_seconds, on_lost)
        log.info("lease.acquired", key=key, owner=self.owner, token=revision)
        return lease

    async def wait_acquire(self, key: str, on_lost: OnLost | None = None,
                           poll_seconds: float | None = None) -> Lease:
        """Try every ``poll_seconds`` (default a fifth of the renew interval) until the lease
        on ``key`` is ours; bound it with ``asyncio.timeout`` if need be. A try that gets no
        answer (no server, a stream leader being elected) is logged and tried again."""
        poll = poll_seconds if poll_seconds is not None else self.renew_seconds / 5
        while True:
            try:
                lease = await asyncio.wait_for(self.acquire(key, on_lost), self.ttl_seconds)
            except (NatsError, asyncio.TimeoutError, OSError) as exc:
                log.warning("lease.acquire_failed", key=key, owner=self.owner,
                            error=f"{type(exc).__name__}: {exc}")
                lease = None
            if lease is not None:
                return lease
            await asyncio.sleep(poll)

    async def _latest(self, key: str) -> _Latest | None:
        """The key's last message from the stream leader (not a direct get, which a replica
        may answer from behind), or None if the key has none."""
        try:
            msg = await self._js.get_msg(f"KV_{BUCKET}", subject=f"$KV.{BUCKET}.{key}")
        except NotFoundError:
            return None
        seq = int(msg.seq or 0)
        headers = msg.headers or {}
        if _MARKER_REASON in headers or headers.get(_KV_OP) in ("DEL", "PURGE"):
            return _Latest(seq, None)
        value = json.loads(msg.data or b"{}")
        return _Latest(seq, Holder(owner=str(value.get("owner", "")),
                                   token=int(value.get("token") or seq), revision=seq))

    async def _update(self, key: str, value: bytes, last: int) -> int:
        return await self._kv.update(key, value, last=last)

    async def _delete(self, key: str, last: int) -> None:
        await self._kv.delete(key, last=last)


def _value(owner: str, token: int | None) -> bytes:
    """The entry's value: the owner, and (in renewals) the tenure's token. The acquiring
    write carries no token: its own revision is the token."""
    body: dict[str, object] = {"owner": owner}
    if token is not None:
        body["token"] = token
    return json.dumps(body).encode()


class Lease:
    """A held lease: renewed by its own task until :meth:`release` or a loss."""

    def __init__(self, leases: Leases, key: str, revision: int, expires_at: float,
                 on_lost: OnLost | None) -> None:
        self._leases = leases
        self.key = key
        self.token = revision
        """The fencing token: the revision that acquired this lease, the same for the whole
        tenure; every later tenure of the key has a larger one."""
        self.revision = revision
        """The key's last revision as written by us (the last renewal)."""
        self._expires_at = expires_at
        self._next_renewal = expires_at - leases.ttl_seconds + leases.renew_seconds
        self._on_lost = on_lost
        self.lost_reason: str | None = None
        self._task = asyncio.create_task(self._renew_forever(), name=f"lease-renew-{key}")

    @property
    def owner(self) -> str:
        return self._leases.owner

    @property
    def held(self) -> bool:
        """Not lost, released nor run out by the local clock (the TTL counted from when the
        last renewal that succeeded was sent: never later than the server's expiry)."""
        return self.lost_reason is None and time.monotonic() < self._expires_at

    @property
    def lost(self) -> bool:
        return self.lost_reason is not None and self.lost_reason != "released"

    async def check(self) -> bool:
        """The fencing check before a commit: the bucket still names this tenure's token, and
        by the local clock the lease had not run out when that answer came back."""
        if not self.held:
            return False
        return await self._leases.check(self.key, self.token) and self.held

    async def renew(self) -> bool:
        """One renewal now (the task calls this every ``renew_seconds``): a compare-and-set
        on our last revision. A refusal loses the lease at once; an error (no answer, no
        server) loses it only once the TTL has run out, and is tried again before then."""
        for _ in range(2):  # a second time only after adopting a renewal whose answer was lost
            if self.lost_reason is not None:
                return False
            leases = self._leases
            sent = time.monotonic()
            wait = max(leases.renew_seconds, self._expires_at - sent)
            try:
                self.revision = await asyncio.wait_for(leases._update(
                    self.key, _value(leases.owner, self.token), self.revision), wait)
            except APIError as exc:
                if not _is_wrong_last(exc):
                    return self._failed(exc)
                try:
                    holder = await self._leases.holder(self.key)
                except (NatsError, asyncio.TimeoutError, OSError) as lookup:
                    return self._failed(lookup)
                if holder is None or holder.owner != leases.owner or holder.token != self.token:
                    self._lose("expired" if holder is None else "taken")
                    return False
                self.revision = holder.revision
                continue
            except (NatsError, asyncio.TimeoutError, OSError) as exc:
                return self._failed(exc)
            self._expires_at = sent + leases.ttl_seconds
            self._next_renewal = sent + leases.renew_seconds
            return True
        return False

    async def release(self) -> None:
        """A planned handoff: stop renewing and delete the entry (only if it is still ours),
        so the next owner takes the key at once. ``on_lost`` is not called."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self.lost_reason is not None:
            return
        self.lost_reason = "released"
        for _ in range(2):
            try:
                await self._leases._delete(self.key, self.revision)
            except APIError as exc:
                holder = await self._still_ours() if _is_wrong_last(exc) else None
                if holder is not None:
                    self.revision = holder.revision  # a renewal landed as we cancelled it
                    continue
                log.warning("lease.release_failed", key=self.key, token=self.token,
                            error=f"{type(exc).__name__}: {exc}")
                return
            log.info("lease.released", key=self.key, owner=self._leases.owner,
                     token=self.token)
            return

    async def _renew_forever(self) -> None:
        """The lease's own task: it awaits nothing but its sleep and the KV call."""
        try:
            while self.lost_reason is None:
                await asyncio.sleep(max(0.0, self._next_renewal - time.monotonic()))
                await self.renew()
        except Exception:  # a bug must not leave a holder that believes it holds
            log.error("lease.renew_crashed", exc_info=True, key=self.key)
            self._lose("error")

    async def _still_ours(self) -> Holder | None:
        """The key's holder if it is still this tenure (a renewal whose answer we lost had
        landed), else None."""
        try:
            holder = await self._leases.holder(self.key)
        except (NatsError, asyncio.TimeoutError, OSError):
            return None
        if holder is None or holder.owner != self._leases.owner or holder.token != self.token:
            return None
        return holder

    def _failed(self, exc: BaseException) -> bool:
        log.warning("lease.renew_failed", key=self.key, token=self.token,
                    error=f"{type(exc).__name__}: {exc}")
        if time.monotonic() >= self._expires_at:
            self._lose("expired")
        else:
            self._next_renewal = time.monotonic() + self._leases.renew_seconds / 5
        return False

    def _lose(self, reason: str) -> None:
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        log.warning("lease.lost", key=self.key, owner=self._leases.owner, token=self.token,
                    reason=reason)
        if self._on_lost is not None:
            try:
                self._on_lost(self, reason)
            except Exception:
                log.error("lease.on_lost_failed", exc_info=True, key=self.key)
