"""Partition leases (appliance/lease.py) against a real nats-server.

The holder that is SIGKILLed or SIGSTOPped is a real child process: this file run as
``python -m tests.test_lease URL KEY TTL RENEW MODE`` (see :func:`hold`). Tests other than
the SIGKILL measurement use a 1 s TTL to stay short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError

from appliance.errors import SettingsError
from appliance.lease import BUCKET, Lease, Leases, nothing_to_witness, partition_key
from appliance.operations.node import EmbeddedNats
from appliance.settings import Settings, load

ROOT = Path(__file__).resolve().parent.parent
TTL, RENEW = 1.0, 0.25  # short, for the tests that measure nothing


def lease_settings(ttl: float = TTL, renew: float = RENEW) -> Settings:
    return load(None, env={}, lease_ttl_seconds=ttl, lease_renew_seconds=renew)


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def open_leases(url: str, stack: contextlib.AsyncExitStack, owner: str,
                      ttl: float = TTL, renew: float = RENEW) -> Leases:
    """Leases on a connection of their own, as another process would have."""
    js = await stack.enter_async_context(jetstream(url))
    return await Leases.open(js, lease_settings(ttl, renew), owner=owner)


class Holder:
    """A lease holder in a child process, read line by line (JSON events)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, url: str, key: str, ttl: float, renew: float,
                    mode: str) -> Holder:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.test_lease", url, key, str(ttl), str(renew), mode,
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE)
        holder = cls(process)
        await holder.wait_for("acquired", 20)
        return holder

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.events.append(json.loads(line))

    async def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                found = [e for e in self.events if e["event"] == event]
                if found:
                    return found[0]
                if self._reader.done():
                    raise AssertionError(f"holder ended without {event!r}: {self.events}")
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
                self.process.kill()
        await self.process.wait()
        await self._reader


def test_two_contenders_exactly_one_wins(nats_url: str) -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            a = await open_leases(nats_url, stack, "a")
            b = await open_leases(nats_url, stack, "b")
            for p in range(5):
                key = partition_key(p)
                won = [lease for lease in await asyncio.gather(a.acquire(key), b.acquire(key))
                       if lease is not None]
                assert len(won) == 1, f"{key}: {len(won)} winners"
                winner = won[0]
                loser = b if winner.owner == "a" else a
                assert await loser.acquire(key) is None  # and it stays held
                holder = await a.holder(key)
                assert holder is not None and holder.owner == winner.owner
                assert holder.token == winner.token
                assert await loser.check(key, winner.token)
                assert not await loser.check(key, winner.token - 1)
                await winner.release()
            # every owner sharing the bucket must agree on its TTL
            with pytest.raises(SettingsError, match="lease_ttl_seconds"):
                await open_leases(nats_url, stack, "c", ttl=2.0, renew=0.5)

    asyncio.run(main())


def test_sigkilled_holder_is_taken_over_within_the_ttl(nats_url: str) -> None:
    settings = load(None, env={})  # the defaults: what a node runs with
    ttl = settings.lease_ttl_seconds

    async def main() -> float:
        async with contextlib.AsyncExitStack() as stack:
            holder = await Holder.start(nats_url, "partition.0", ttl,
                                        settings.lease_renew_seconds, "hold")
            stack.push_async_callback(holder.stop)
            js = await stack.enter_async_context(jetstream(nats_url))
            other = await Leases.open(js, settings, owner="survivor")
            takeover = asyncio.create_task(other.wait_acquire("partition.0"))
            # the holder renews: nobody takes it meanwhile; the kill lands anywhere between
            # two renewals, so repeated runs show the spread a real crash would
            await asyncio.sleep(ttl * 1.5 + random.uniform(0, settings.lease_renew_seconds))
            assert not takeover.done()
            killed = time.monotonic()
            holder.process.send_signal(signal.SIGKILL)
            async with asyncio.timeout(ttl * 3):
                lease = await takeover
            seconds = time.monotonic() - killed
            assert lease.token > (await holder.wait_for("acquired", 1))["token"]
            await lease.release()
            return seconds

    seconds = asyncio.run(main())
    sys.stdout.write(f"\nlease takeover after SIGKILL: {seconds:.3f} s (ttl {ttl} s)\n")


def test_late_renewal_after_a_takeover_is_refused(nats_url: str) -> None:
    # The old holder's event loop runs in a thread of its own, so it can be frozen as a
    # paused process would be, while the new holder runs in this one.
    loop_a = asyncio.new_event_loop()
    thread = threading.Thread(target=loop_a.run_forever, daemon=True)
    thread.start()
    lost: list[str] = []
    lost_event = threading.Event()

    def on_lost(lease: Lease, reason: str) -> None:
        lost.append(reason)
        lost_event.set()

    async def acquire_a() -> tuple[Any, Lease]:
        nc = await nats.connect(nats_url)
        leases = await Leases.open(nc.jetstream(), lease_settings(), owner="old")
        lease = await leases.acquire("partition.3", on_lost)
        assert lease is not None
        return nc, lease

    nc_a, lease_a = asyncio.run_coroutine_threadsafe(acquire_a(), loop_a).result(10)

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            b = await open_leases(nats_url, stack, "new")
            await asyncio.sleep(TTL * 1.5)
            assert await b.acquire("partition.3") is None  # the old holder renews it
            old_revision = lease_a.revision
            loop_a.call_soon_threadsafe(time.sleep, TTL * 2.5)  # the old holder stalls
            async with asyncio.timeout(TTL * 3):
                lease_b = await b.wait_acquire("partition.3")
            assert lease_b.token > lease_a.token
            # the old holder wakes: its renewal (with its old revision) is refused
            assert await asyncio.to_thread(lost_event.wait, 10)
            assert lost == ["taken"]
            # (a renewal sent just before the stall may have landed, answered only on waking:
            # its revision is then the old holder's last, still below the new tenure's)
            assert not lease_a.held and old_revision <= lease_a.revision < lease_b.token
            holder = await b.holder("partition.3")
            assert holder is not None and holder.owner == "new" and lease_b.held
            assert not await b.check("partition.3", lease_a.token)
            # the same late write, by hand, is refused too
            kv = await stack.enter_async_context(jetstream(nats_url))
            with pytest.raises(KeyWrongLastSequenceError):
                await (await kv.key_value(BUCKET)).update(
                    "partition.3", b'{"owner": "old"}', last=lease_a.revision)
            await lease_b.release()

    try:
        asyncio.run(main())
    finally:
        asyncio.run_coroutine_threadsafe(nc_a.close(), loop_a).result(10)
        loop_a.call_soon_threadsafe(loop_a.stop)
        thread.join(10)
        loop_a.close()


def test_release_hands_over_without_waiting_for_the_ttl(nats_url: str) -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            lost: list[str] = []
            a = await open_leases(nats_url, stack, "a", ttl=2.0, renew=0.5)
            b = await open_leases(nats_url, stack, "b", ttl=2.0, renew=0.5)
            lease_a = await a.acquire("partition.1", lambda _, reason: lost.append(reason))
            assert lease_a is not None and await b.acquire("partition.1") is None
            released = time.monotonic()
            await lease_a.release()
            lease_b = await b.acquire("partition.1")  # one try, no waiting: it is free now
            seconds = time.monotonic() - released
            assert lease_b is not None and lease_b.token > lease_a.token
            assert lost == [] and not lease_a.held and not lease_a.lost
            assert not await lease_a.check()
            sys.stdout.write(f"\nlease handoff by release: {seconds:.3f} s\n")
            await lease_b.release()

    asyncio.run(main())


def test_a_lease_taken_from_under_its_holder_fails_the_fence_at_once(nats_url: str) -> None:
    # An operator deletes the key (nats kv del) and another scorer takes it at once: the old
    # holder's clock still says it holds, but its check asks the bucket and fails, and its
    # next renewal loses the lease.
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            lost: list[str] = []
            a = await open_leases(nats_url, stack, "a")
            b = await open_leases(nats_url, stack, "b")
            lease_a = await a.acquire("partition.5", lambda _, reason: lost.append(reason))
            assert lease_a is not None and await lease_a.check()
            js = await stack.enter_async_context(jetstream(nats_url))
            await (await js.key_value(BUCKET)).delete("partition.5")
            lease_b = await b.acquire("partition.5")
            assert lease_b is not None
            assert lease_a.held  # by its own clock
            assert not await lease_a.check()  # but not by the bucket
            assert await lease_b.check()
            async with asyncio.timeout(TTL * 3):
                while not lost:
                    await asyncio.sleep(0.02)
            assert lost == ["taken"] and not lease_a.held
            await lease_b.release()

    asyncio.run(main())


def busy(seconds: float) -> int:
    """Pure-Python work that holds the GIL but for the interpreter's switches."""
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


def test_renewal_goes_on_while_other_work_blocks_a_thread(nats_url: str) -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            lost: list[str] = []
            a = await open_leases(nats_url, stack, "a")
            b = await open_leases(nats_url, stack, "b")
            lease = await a.acquire("partition.2", lambda _, reason: lost.append(reason))
            assert lease is not None
            revision = lease.revision
            taken: list[Lease] = []

            async def contend() -> None:
                while True:
                    other = await b.acquire("partition.2")
                    if other is not None:
                        taken.append(other)
                    await asyncio.sleep(0.1)

            contender = asyncio.create_task(contend())
            await asyncio.to_thread(busy, TTL * 3)  # a restore, a rebuild: 3 TTLs long
            contender.cancel()
            assert taken == [] and lost == []
            assert lease.held and await lease.check()
            renewals = lease.revision - revision
            assert renewals >= TTL * 3 / RENEW / 2, renewals  # it kept renewing
            await lease.release()

    asyncio.run(main())


def test_a_stopped_holder_loses_its_lease_and_its_writes_are_fenced(nats_url: str) -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            zombie = await Holder.start(nats_url, "partition.4", TTL, RENEW, "write")
            stack.push_async_callback(zombie.stop)
            token = (await zombie.wait_for("acquired", 1))["token"]
            other = await open_leases(nats_url, stack, "successor")
            await asyncio.sleep(TTL)
            stopped = time.time()
            zombie.process.send_signal(signal.SIGSTOP)
            async with asyncio.timeout(TTL * 3):
                lease = await other.wait_acquire("partition.4")
            zombie.process.send_signal(signal.SIGCONT)
            lost = await zombie.wait_for("lost", 10)
            done = await zombie.wait_for("done", 10)
            assert lost["reason"] == "taken"
            assert done["fence"] is False  # the bucket no longer names its token
            checks = [e for e in zombie.events if e["event"] == "check"]
            assert any(e["ok"] for e in checks if e["t"] < stopped)  # it wrote while it held
            late = [e for e in checks if e["t"] > stopped]
            assert late and not any(e["ok"] for e in late)  # and not once after
            assert lease.held and lease.token > token
            holder = await other.holder("partition.4")
            assert holder is not None and holder.owner == "successor"
            await lease.release()

    asyncio.run(main())


def test_renewal_must_be_well_inside_the_ttl() -> None:
    with pytest.raises(SettingsError, match="lease_renew_seconds"):
        lease_settings(ttl=2.0, renew=1.0)
    assert lease_settings(ttl=2.0, renew=0.9).lease_renew_seconds == 0.9


def test_a_stopped_holder_with_its_state_intact_takes_its_lease_back(nats_url: str) -> None:
    # Nobody took the key while its holder was stopped past the TTL (as when the bucket has
    # no leader during an election): the entry expired, and the holder, whose witness says
    # its state is untouched, takes it back under a new token, and never loses it.
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            holder = await Holder.start(nats_url, "partition.6", TTL, RENEW, "witness-yes")
            stack.push_async_callback(holder.stop)
            token = (await holder.wait_for("acquired", 1))["token"]
            other = await open_leases(nats_url, stack, "other")
            holder.process.send_signal(signal.SIGSTOP)
            stopped = time.time()
            await asyncio.sleep(TTL * 2.5)
            assert await other.holder("partition.6") is None  # it expired
            holder.process.send_signal(signal.SIGCONT)
            back = await holder.wait_for("reclaimed", 10)
            assert back["token"] > token and back["held"]
            assert await other.acquire("partition.6") is None  # it is held again
            current = await other.holder("partition.6")
            assert current is not None and current.token == back["token"]
            await asyncio.sleep(TTL * 2)  # and stays held: renewed under the new token
            assert not [e for e in holder.events if e["event"] == "lost"]
            waits = [e for e in holder.events if e["event"] == "waited"]
            assert waits and all(e["held"] for e in waits)  # a writer waited, then wrote
            assert all(not e["ok"] for e in holder.events  # and not while it had lapsed
                       if e["event"] == "check" and stopped < e["t"] < back["t"])

    asyncio.run(main())


def test_a_stopped_holder_whose_witness_cannot_vouch_gives_the_key_up(nats_url: str) -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            holder = await Holder.start(nats_url, "partition.7", TTL, RENEW, "witness-no")
            stack.push_async_callback(holder.stop)
            other = await open_leases(nats_url, stack, "other")
            holder.process.send_signal(signal.SIGSTOP)
            await asyncio.sleep(TTL * 2.5)
            holder.process.send_signal(signal.SIGCONT)
            lost = await holder.wait_for("lost", 10)
            assert lost["reason"] == "expired"
            assert not [e for e in holder.events if e["event"] == "reclaimed"]
            assert await other.holder("partition.7") is None  # given up: free at once
            lease = await other.acquire("partition.7")
            assert lease is not None
            await lease.release()

    asyncio.run(main())


def test_a_lease_rides_out_a_silent_bucket(tmp_path: Path) -> None:
    # The bucket's server stops answering for longer than the TTL, as while an election
    # runs: the lease lapses (not held, so its holder writes nothing), then is held again
    # once the server answers, with no loss; a writer waiting on it goes on.
    server = EmbeddedNats(load(None, env={}, data_dir=tmp_path / "nats", nats_port=0))
    url = server.start()

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            lost: list[str] = []
            a = await open_leases(url, stack, "a")
            lease = await a.acquire("partition.8", lambda _, reason: lost.append(reason),
                                    witness=nothing_to_witness)
            assert lease is not None
            waiting = asyncio.create_task(lease.wait_held())
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(TTL * 2)
                assert not lease.held and not lease.ended  # lapsed, not lost
                writer = asyncio.create_task(lease.wait_held())
                await asyncio.sleep(TTL)
                assert not writer.done()  # a writer waits out the lapse
            finally:
                server.process.send_signal(signal.SIGCONT)
            async with asyncio.timeout(TTL * 10):
                assert await writer
            assert lease.held and lost == [] and waiting.done()
            holder = await a.holder("partition.8")
            assert holder is not None and holder.owner == "a" and holder.token == lease.token
            await lease.release()

    try:
        asyncio.run(main())
    finally:
        server.stop()


async def hold(url: str, key: str, ttl: float, renew: float, mode: str) -> None:
    """The child holder: acquire ``key``, say so, and hold it until killed. In ``write`` mode
    it also checks its fence every 50 ms, as a writer would before each commit, and ends
    once it has lost the lease. In ``witness-yes`` and ``witness-no`` modes its lease has a
    witness that vouches (or not) for its state, so it may ride out a lapse; it checks its
    fence every 50 ms, and waits out a lapse as a writer does, saying what it waited for."""
    def emit(event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
        sys.stdout.flush()

    lost = asyncio.Event()

    def on_lost(lease: Lease, reason: str) -> None:
        emit("lost", reason=reason)
        lost.set()

    async with jetstream(url) as js:
        leases = await Leases.open(js, lease_settings(ttl, renew))
        lease = await leases.wait_acquire(key, on_lost)
        emit("acquired", token=lease.token)
        if mode == "hold":
            await asyncio.Event().wait()
        if mode.startswith("witness"):
            async def witness() -> bool:
                return mode == "witness-yes"
            lease.witness = witness
            token = lease.token
            while not lost.is_set():
                emit("check", ok=lease.held and await lease.check())
                if not lease.held:
                    held = await lease.wait_held()
                    emit("waited", held=held)
                if lease.token != token:
                    emit("reclaimed", token=lease.token, held=lease.held)
                    token = lease.token
                await asyncio.sleep(0.05)
            return
        while not lost.is_set():
            emit("check", ok=await lease.check())
            await asyncio.sleep(0.05)
        emit("check", ok=await lease.check())  # one more try at a write, after the loss
        emit("done", fence=await leases.check(key, lease.token))


if __name__ == "__main__":
    url, key, ttl, renew, mode = sys.argv[1:6]
    asyncio.run(hold(url, key, float(ttl), float(renew), mode))
