"""Partitioned scorers (``branchguard cluster scorer``) as child processes of a benchmark or a
drill, and what can be read of them from outside: their JSON logs (which partitions each
holds, whether it runs the terminal stage, when it took a lease or opened a partition) and
each partition's committed checkpoint, polled from its SQLite database.

Both the scale-out drill (:mod:`.scaleout`) and ``branchguard bench cluster``
(:mod:`.cluster`) start their scorers and time their failovers through this module, so the
two measure the same thing the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
from nats.errors import Error as NatsError

from ..lease import partition_key
from ..operations.child import terminate
from ..scoring.streams import TX_STREAM, during_election
from ..scoring.terminal_stage import LEASE_KEY as STAGE_LEASE_KEY
from ..settings import nats_servers
from .delivery import quiet_errors

PARTITIONS = 6


def scorer_env(cluster_url: str, data_dir: Path) -> dict[str, str]:
    """The settings (environment variables) every partitioned scorer of a run shares: the
    cluster, one data directory, :data:`PARTITIONS` partitions of R3 streams, simulated
    history (the event-time window off), no alert budget, no Litestream, no API, and no case
    flows to an analyst host (the simulated stream alerts on almost every transaction, so
    they would measure the flows, not the scorers: tests/test_case_flows.py turns them on)."""
    return {"BRANCHGUARD_NATS_URL": cluster_url, "BRANCHGUARD_DATA_DIR": str(data_dir),
            "BRANCHGUARD_PARTITIONS": str(PARTITIONS), "BRANCHGUARD_STREAM_REPLICAS": "3",
            "BRANCHGUARD_EVENT_TIME_CHECK": "false", "BRANCHGUARD_ALERT_BUDGET": "false",
            "BRANCHGUARD_REPLICATE": "false", "BRANCHGUARD_RUN_API": "false",
            "BRANCHGUARD_CASE_FLOWS": "false", "BRANCHGUARD_LOG_LEVEL": "INFO"}


def log_time(event: dict[str, Any]) -> float:
    """A log line's ``ts`` as epoch seconds."""
    return datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp()


@dataclass
class ScorerChild:
    """``branchguard cluster scorer`` as a child process, with its own log."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, env: dict[str, str], logs: Path,
              command: tuple[str, ...] = ("cluster", "scorer")) -> ScorerChild:
        """Start ``branchguard <command>`` (the scorer, or another of the cluster's
        processes, such as ``cluster analyst``)."""
        log = logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "appliance", *command],
                                       stdout=out, stderr=subprocess.STDOUT,
                                       env={**os.environ, **env})
        return cls(name, process, log)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def held(self) -> set[int]:
        """The partitions this scorer holds now, by its log."""
        held: set[int] = set()
        for e in self.events():
            if e.get("event") == "partition.opening":
                held.add(int(e["partition"]))
            elif e.get("event") in ("partition.handed_off", "partition.lost",
                                    "partition.fenced", "partition.failed"):
                held.discard(int(e["partition"]))
        return held

    def opened(self) -> set[int]:
        """The partitions this scorer holds and has opened (consumer created, state
        rebuilt), by its log."""
        held = self.held()
        return {int(e["partition"]) for e in self.events()
                if e.get("event") == "partition.open" and int(e["partition"]) in held}

    def runs_terminal_stage(self) -> bool:
        """Whether this scorer took the terminal stage's lease (and has not lost it)."""
        have = False
        for e in self.events():
            if e.get("key") != STAGE_LEASE_KEY:
                continue
            if e.get("event") == "lease.acquired":
                have = True
            elif e.get("event") in ("lease.lost", "lease.released"):
                have = False
        return have

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM (a clean handoff), SIGKILL after ``grace``; by its PID."""
        if self.process.poll() is None:  # a stopped one (the zombie) must run to hear it
            with contextlib.suppress(OSError):
                self.process.send_signal(signal.SIGCONT)
        return terminate(self.process, grace)


def partition_db(data_dir: Path, p: int) -> Path:
    return data_dir / "partitions" / f"p{p}" / "branchguard.db"


def read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)


def checkpoints(data_dir: Path) -> dict[int, int]:
    """Each partition's committed stream sequence (0 before its first commit)."""
    out: dict[int, int] = {}
    for p in range(PARTITIONS):
        db = partition_db(data_dir, p)
        out[p] = 0
        if not db.exists():
            continue
        try:
            conn = read_only(db)
            try:
                row = conn.execute("SELECT stream_seq FROM checkpoints WHERE consumer = ?",
                                   [f"scorer-p{p}"]).fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            continue
        out[p] = int(row[0]) if row else 0
    return out


class CommitWatch(threading.Thread):
    """Polls every partition's checkpoint; records when each one moved."""

    def __init__(self, data_dir: Path, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.data_dir = data_dir
        self.every = every
        self.moves: list[tuple[float, int, int]] = []  # (epoch seconds, partition, seq)
        self.halt = threading.Event()

    def run(self) -> None:
        last: dict[int, int] = {}
        while not self.halt.is_set():
            now = time.time()
            for p, seq in checkpoints(self.data_dir).items():
                if seq != last.get(p, 0):
                    self.moves.append((now, p, seq))
                    last[p] = seq
            time.sleep(self.every)

    def first_commit_after(self, p: int, t: float) -> float | None:
        return next((at for at, q, _ in self.moves if q == p and at > t), None)

    def first_reaching(self, p: int, seq: int, t: float) -> float | None:
        """When partition ``p``'s checkpoint, after ``t``, first reached ``seq``."""
        return next((at for at, q, s in self.moves if q == p and at > t and s >= seq), None)


def partition_of(subject: str) -> int:
    """The partition of a ``TX`` message by its stored subject (``txp.<p>.…``); what the
    transform left alone (``tx.…``) is partition 0's."""
    tokens = subject.split(".")
    return int(tokens[1]) if tokens[0] == "txp" else 0


def last_per_partition(subjects: list[str]) -> dict[int, int]:
    """The last ``TX`` sequence of each partition, the stream's subjects given in order
    from sequence 1 (limits retention: nothing is removed during a run)."""
    last: dict[int, int] = {}
    for seq, subject in enumerate(subjects, start=1):
        last[partition_of(subject)] = seq
    return last


def caught_up(data_dir: Path, subjects: list[str]) -> bool:
    """Every partition's checkpoint has reached the last message stored in it."""
    have = checkpoints(data_dir)
    return all(have.get(p, 0) >= seq for p, seq in last_per_partition(subjects).items())


def first_event(events: list[dict[str, Any]], name: str, after: float, **match: Any
                ) -> float | None:
    """When the first log line ``name`` matching ``match`` came after ``after`` (epoch s),
    whichever process's log it is in (``events`` may join several)."""
    times = [at for e in events
             if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
             and (at := log_time(e)) > after]
    return min(times, default=None)


def lease_taken(events: list[dict[str, Any]], p: int, after: float) -> float | None:
    return first_event(events, "lease.acquired", after, key=partition_key(p))


def since(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return bool(condition())


def stream_count(url: str, stream: str) -> int:
    """How many messages ``stream`` holds now (0 while it cannot be asked: an election)."""
    async def ask() -> int:
        nc = await nats.connect(nats_servers(url), error_cb=quiet_errors, connect_timeout=1)
        try:
            return int((await nc.jetstream(timeout=2.0).stream_info(stream)).state.messages)
        except (NatsError, TimeoutError):
            return 0
        finally:
            await nc.close()
    return asyncio.run(ask())


async def tx_leader(url: str) -> str:
    """The name of the server leading ``TX`` now."""
    nc = await nats.connect(nats_servers(url), error_cb=quiet_errors, connect_timeout=1)
    try:
        info = await nc.jetstream().stream_info(TX_STREAM)
        return str(info.cluster.leader) if info.cluster is not None else ""
    finally:
        await nc.close()


def tx_subjects(url: str) -> list[str]:
    """Every ``TX`` message's subject, in stream order."""
    async def read() -> list[str]:
        nc = await nats.connect(nats_servers(url), error_cb=quiet_errors, connect_timeout=1)
        try:
            js = nc.jetstream(timeout=5.0)
            last = (await during_election(lambda: js.stream_info(TX_STREAM),
                                          "stream_info")).state.last_seq
            out: list[str] = []
            if not last:
                return out
            # after a server's death the cluster may still be settling: retried
            sub = await during_election(lambda: js.subscribe(
                ">", stream=TX_STREAM, ordered_consumer=True), "subscribe")
            while len(out) < last:
                msg = await sub.next_msg(timeout=10.0)
                out.append(msg.subject)
            await sub.unsubscribe()
            return out
        finally:
            await nc.close()
    return asyncio.run(read())
