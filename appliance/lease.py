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

**A lapse is not a loss.** While the bucket cannot answer (its stream leader is being
elected after a server died), nobody can take the key either. Past its TTL without an answer
the lease *lapses*: ``held`` is false, so its holder writes nothing and waits
(:meth:`Lease.wait_held`), and the renewal task keeps trying. When the bucket answers, one of
three things is true: the entry is still ours (renewed: held again, same token); somebody
else holds the key (lost, ``taken``); or it is free because the entry expired meanwhile. In
the last case a lease given a *witness* takes the key back under a new, larger token
(``lease.reclaimed``), but only if the witness says the holder's unit of state was left
untouched (for a partition: its tenure's consumer still exists, which every later tenure
deletes before it reads anything). Without a witness, or when it cannot vouch, the lease is
lost (``expired``) as before, and the next owner starts from the checkpoint. So a holder
rides out an election of any length with its state and consumer intact, instead of
re-opening everything after it, while a SIGKILLed holder's key still comes free after one
TTL. A lapse longer than :data:`LAPSE_SECONDS` is a loss.

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
from collections.abc import Awaitable, Callable
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

LAPSE_SECONDS = 30.0
"""How long a lapsed lease (no answer past its TTL) keeps trying before it counts as lost."""
WITNESS_SHARE = 0.75
"""Of the TTL, how long a reclaiming holder may take to ask its witness."""
POLL_SECONDS = 0.05
"""How often a writer waiting out a lapse looks again."""

_KV_OP = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"
_WRONG_LAST_SEQUENCE = (10071, 10164)

OnLost = Callable[["Lease", str], None]
"""Called once, from the renewal task, when a lease is lost: with the lease and the reason
(``taken``: another owner holds the key now; ``expired``: the entry ran out, or no renewal
was answered within the TTL). It must not block: set a flag, cancel a task."""

Witness = Callable[[], Awaitable[bool]]
"""Asked before a lapsed lease is taken back: whether the holder's unit of state is exactly
as it left it (no later tenure touched it). An error counts as "cannot tell yet"."""


async def nothing_to_witness() -> bool:
    """The witness of a lease that guards no state (a scorer's membership)."""
    return True


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

    async def acquire(self, key: str, on_lost: OnLost | None = None,
                      witness: Witness | None = None) -> Lease | None:
        """One try: the lease on ``key`` if it is free (and nobody beat us to it), else None.
        The returned lease renews itself until it is released or lost. ``witness`` (also
        settable later, as ``Lease.witness``) lets it ride out a lapse (module docstring)."""
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
        lease.witness = witness
        log.info("lease.acquired", key=key, owner=self.owner, token=revision)
        return lease

    async def wait_acquire(self, key: str, on_lost: OnLost | None = None,
                           poll_seconds: float | None = None,
                           witness: Witness | None = None) -> Lease:
        """Try every ``poll_seconds`` (default a fifth of the renew interval) until the lease
        on ``key`` is ours; bound it with ``asyncio.timeout`` if need be. A try that gets no
        answer (no server, a stream leader being elected) is logged and tried again."""
        poll = poll_seconds if poll_seconds is not None else self.renew_seconds / 5
        while True:
            try:
                lease = await asyncio.wait_for(self.acquire(key, on_lost, witness),
                                               self.ttl_seconds)
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
        self.witness: Witness | None = None
        """Set by the holder once it has state to vouch for: the lease may then ride out a
        lapse (module docstring). None: a lapse past the TTL is a loss."""
        self._lapsed = False
        self.held_since = time.monotonic()
        """When it was last taken, or held again after a lapse (monotonic seconds)."""
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

    @property
    def ended(self) -> bool:
        """Lost or released: it will never be held again (a lapse is not an end)."""
        return self.lost_reason is not None

    async def wait_held(self, stopping: Callable[[], bool] | None = None) -> bool:
        """A writer's fence: True at once while held; during a lapse, wait until it is held
        again (True) or it ends, or ``stopping()`` turns true (False)."""
        while not self.held:
            if self.ended or (stopping is not None and stopping()):
                return False
            await asyncio.sleep(POLL_SECONDS)
        return True

    def wait_held_blocking(self) -> bool:
        """:meth:`wait_held` for a worker thread (the scorer's commit thread)."""
        while not self.held:
            if self.ended:
                return False
            time.sleep(POLL_SECONDS)
        return True

    async def check(self) -> bool:
        """The fencing check before a commit: the bucket still names this tenure's token, and
        by the local clock the lease had not run out when that answer came back."""
        if not self.held:
            return False
        return await self._leases.check(self.key, self.token) and self.held

    async def renew(self) -> bool:
        """One renewal now (the task calls this every ``renew_seconds``): a compare-and-set
        on our last revision. A refusal ends the lease at once, unless the key is free and
        the witness lets us take it back (:meth:`_reclaim`); an error (no answer, no server)
        is tried again, and past the TTL the lease lapses (or, with no witness, is lost)."""
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
                    latest = await asyncio.wait_for(leases._latest(self.key),
                                                    leases.renew_seconds)
                except (NatsError, asyncio.TimeoutError, OSError) as lookup:
                    return self._failed(lookup)
                holder = latest.holder if latest is not None else None
                if holder is not None and holder.owner == leases.owner:
                    if holder.token == self.token:
                        self.revision = holder.revision
                        continue
                    # our own reclaim whose answer was lost: vouch for it as if just written
                    return await self._resume(holder.token, holder.revision, sent)
                if holder is None and self.witness is not None:
                    return await self._reclaim(latest.revision if latest is not None else 0)
                self._lose("expired" if holder is None else "taken")
                return False
            except (NatsError, asyncio.TimeoutError, OSError) as exc:
                return self._failed(exc)
            self._renewed(sent)
            return True
        return False

    async def _reclaim(self, last: int) -> bool:
        """The key came free while we could not renew (it expired during an election):
        take it back by compare-and-set on its marker, then ask the witness."""
        leases = self._leases
        sent = time.monotonic()
        try:
            revision = await asyncio.wait_for(
                leases._update(self.key, _value(leases.owner, None), last),
                leases.renew_seconds)
        except APIError as exc:
            if _is_wrong_last(exc):  # somebody wrote first: the next renewal looks again
                self._next_renewal = time.monotonic()
                return False
            return self._failed(exc)
        except (NatsError, asyncio.TimeoutError, OSError) as exc:
            return self._failed(exc)
        return await self._resume(revision, revision, sent)

    async def _resume(self, token: int, revision: int, sent: float) -> bool:
        """We hold the key again under ``token``: carry on if the witness vouches that our
        state is untouched, else give the key up (deleted, so the next owner need not wait
        for a TTL) and end as ``expired``."""
        leases = self._leases
        deadline = sent + leases.ttl_seconds * WITNESS_SHARE
        vouched = False
        while not vouched and time.monotonic() < deadline:
            try:
                vouched = await asyncio.wait_for(self._vouch(),
                                                 max(0.05, deadline - time.monotonic()))
                if not vouched:
                    break
            except (NatsError, asyncio.TimeoutError, OSError) as exc:
                log.warning("lease.witness_failed", key=self.key, token=token,
                            error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(leases.renew_seconds / 5)
        if not vouched or time.monotonic() >= sent + leases.ttl_seconds:
            with contextlib.suppress(NatsError, asyncio.TimeoutError, OSError):
                await asyncio.wait_for(leases._delete(self.key, revision), leases.renew_seconds)
            self._lose("expired")
            return False
        previous, self.token, self.revision = self.token, token, revision
        self._renewed(sent)
        self._lapsed, self.held_since = False, time.monotonic()
        log.info("lease.reclaimed", key=self.key, owner=leases.owner, token=token,
                 previous=previous)
        return True

    async def _vouch(self) -> bool:
        witness = self.witness
        return witness is not None and await witness()

    def _renewed(self, sent: float) -> None:
        self._expires_at = sent + self._leases.ttl_seconds
        self._next_renewal = sent + self._leases.renew_seconds
        if self._lapsed:
            self._lapsed = False
            self.held_since = time.monotonic()
            log.info("lease.held_again", key=self.key, token=self.token)

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
        now = time.monotonic()
        if now >= self._expires_at:
            if self.witness is None or now >= self._expires_at + LAPSE_SECONDS:
                self._lose("expired")
                return False
            if not self._lapsed:  # said once, not at every try
                self._lapsed = True
                log.warning("lease.lapsed", key=self.key, token=self.token,
                            error=f"{type(exc).__name__}: {exc}",
                            hint="no answer past the TTL: writing nothing, trying again")
        else:
            log.warning("lease.renew_failed", key=self.key, token=self.token,
                        error=f"{type(exc).__name__}: {exc}")
        self._next_renewal = now + self._leases.renew_seconds / 5
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
