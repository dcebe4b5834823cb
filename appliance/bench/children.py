"""``branchguard bench children``: the kill -9 drill.

It runs ``branchguard run --demo`` (the real node, as a separate process, on a throwaway data
directory, with the API, an alert destination, replication and the embedded nats-server all
on) and SIGKILLs each of its children in turn, under the demo stream, measuring from the
kill to the moment that child is back *and serving*:

- ``api``: ``/healthz`` answers 200 again;
- ``alerts``: the dispatcher has started again (its ``alerts.dispatcher_started`` line);
- ``litestream``: litestream replicates again (a new ``replicating to`` in its log);
- ``nats-server``: a transaction published after the kill is acked by the stream *and*
  stored by the scorer (so the server is back and the scorer has reconnected).

Then it stops the node as Ctrl-C does and checks the stop was clean (exit code 0,
``node.stopped``, no traceback, no ``nats.disconnected`` warning once stopping), and opens
the stream store again to account for every message: the ``TX`` stream's messages against
the stored transactions and the dead letters (the counts ``branchguard status`` prints),
with the stream sequences that are in neither.
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
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nats

from ..feed.terminal import publish
from ..nats_auth import client_options
from ..operations.node import EmbeddedNats
from ..settings import Settings, load, nats_servers
from ..store import Store
from ..transaction import Transaction

CHILDREN = ("api", "alerts", "litestream", "nats-server")
"""The children of ``branchguard run`` the drill kills, in this order."""


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"
                                                                ).split("\0")[:-1]
    except OSError:
        return []


def _is(name: str, argv: list[str]) -> bool:
    if not argv:
        return False
    if name in ("nats-server", "litestream"):
        return Path(argv[0]).name == name
    words = argv[1:]
    if name == "api":
        return "appliance" in words and "serve" in words
    return "appliance" in words and "alerts" in words and "run" in words


def child_pid(parent: int, name: str) -> int | None:
    """The pid of ``parent``'s running child called ``name`` (see :data:`CHILDREN`)."""
    pids: list[int] = []
    for children in Path(f"/proc/{parent}/task").glob("*/children"):
        try:
            pids.extend(int(p) for p in children.read_text().split())
        except OSError:
            continue
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is not a running child
        except (OSError, IndexError):
            continue
        if _is(name, _argv(pid)):
            return pid
    return None


def zombies(parent: int) -> int:
    """How many of ``parent``'s children are zombies (exited, never reaped)."""
    count = 0
    for children in Path(f"/proc/{parent}/task").glob("*/children"):
        try:
            pids = [int(p) for p in children.read_text().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            count += state == "Z"
    return count


class _AlertSink:
    """A local HTTP receiver for the dispatcher's ``json://`` deliveries: answers 200."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.server.server_address[1]}/"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Node:
    """``branchguard run --demo`` as a process of its own, its log in a file."""

    def __init__(self, data_dir: Path, rate: float, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / "node.log"
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance", "run", "--demo", "--demo-rate", f"{rate:g}",
                 "--demo-days", "0", "--quiet", "--data-dir", str(data_dir)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log().splitlines():
            if f'"{event}"' in line:
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return found

    def wait_for(self, check: Callable[[], bool], timeout: float, what: str) -> float:
        """Seconds until ``check()`` held; raises when the node exited or time ran out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if check():
                return time.monotonic() - started
            if self.process.poll() is not None:
                raise RuntimeError(f"the node exited ({self.process.returncode}) waiting "
                                   f"for {what}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no {what} in {timeout:g} s")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _readyz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as response:  # noqa: S310
            return int(response.status), dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(json.loads(exc.read()))


async def _quiet(exc: Exception) -> None:
    """nats-py's own error callback logs a traceback for each refused connection."""


def _lag(url: str) -> float:
    """The consumer lag ``/readyz`` reports (infinite while it cannot say)."""
    try:
        lag = _readyz(url)[1].get("consumer_lag")
    except (OSError, ValueError):
        return float("inf")
    return float("inf") if lag is None else float(lag)


def _probe(settings: Settings, url: str, name: str, timeout: float) -> str:
    """Publish one transaction, retrying until the stream acks it; returns its id (the
    same id every try: a try whose ack was lost is a re-send, dropped by the stream)."""
    tx = Transaction(transaction_id=f"drill-{name}-{time.time_ns()}", account_id="A-DRILL",
                     amount=12.5, currency="EUR", timestamp=datetime.now(timezone.utc),
                     terminal_id="T-DRILL", channel="POS")

    async def once() -> int:
        nc = await nats.connect(nats_servers(url), connect_timeout=1,
                                max_reconnect_attempts=0, allow_reconnect=False, error_cb=_quiet,
                                **client_options(settings))
        try:
            return await publish(nc, [tx], branch=settings.branch)
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # not back yet: any failure means try again
            if asyncio.run(asyncio.wait_for(once(), 2)) == 1:
                return tx.transaction_id
        time.sleep(0.05)
    raise TimeoutError(f"the stream did not take a transaction in {timeout:g} s")


def _stored(db: Path, transaction_id: str) -> bool:
    conn = sqlite3.connect(db, timeout=5)
    try:
        return conn.execute("SELECT 1 FROM transactions WHERE transaction_id = ?",
                            (transaction_id,)).fetchone() is not None
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def _kill_one(node: _Node, settings: Settings, name: str, nats_url: str, api_url: str,
              timeout: float) -> dict[str, Any]:
    """SIGKILL ``name`` and time it back to serving."""
    pid = child_pid(node.process.pid, name)
    if pid is None:
        return {"back": False, "error": "not running before the kill"}
    litestream_log = settings.data_dir / "litestream" / "litestream.log"
    offset = litestream_log.stat().st_size if litestream_log.exists() else 0
    dispatchers = len(node.events("alerts.dispatcher_started"))
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def replaced() -> bool:
        now = child_pid(node.process.pid, name)
        return now is not None and now != pid

    def serving() -> bool:
        if name == "api":
            return _healthy(api_url)
        if name == "alerts":
            return len(node.events("alerts.dispatcher_started")) > dispatchers
        if name == "litestream":
            with litestream_log.open("rb") as f:
                f.seek(offset)
                return b'"replicating to"' in f.read()
        return True

    out: dict[str, Any] = {"back": False, "pid_before": pid}
    try:
        if name == "nats-server":
            probe = _probe(settings, nats_url, name, timeout)
            out["stream_accepting_seconds"] = round(time.monotonic() - killed, 2)
            node.wait_for(lambda: _stored(settings.db_path, probe),
                          timeout - (time.monotonic() - killed), "the probe stored")
        node.wait_for(lambda: replaced() and serving(), timeout - (time.monotonic() - killed),
                      f"{name} back and serving")
    except TimeoutError as exc:
        return {**out, "error": str(exc)}
    return {**out, "back": True, "seconds": round(time.monotonic() - killed, 2),
            "pid_after": child_pid(node.process.pid, name)}


def _account(settings: Settings) -> dict[str, Any]:
    """Every TX stream message against the stored transactions and dead letters."""
    server = EmbeddedNats(load(None, env={}, data_dir=settings.data_dir, nats_port=0))
    url = server.start()

    async def streams() -> dict[str, Any]:
        nc = await nats.connect(url, **client_options(settings))
        try:
            js = nc.jetstream()
            tx = (await js.stream_info("TX")).state
            dlq = (await js.stream_info("TX_DLQ")).state
            return {"stream_messages": tx.messages, "first_seq": tx.first_seq,
                    "last_seq": tx.last_seq, "dead_letter_stream_messages": dlq.messages}
        finally:
            await nc.close()

    try:
        out = asyncio.run(streams())
    finally:
        server.stop()
    store = Store.open(settings.db_path)
    try:
        counts = store.counts()  # what `branchguard status` prints
        seqs = [int(r[0]) for r in store.reader.execute(
            "SELECT stream_seq FROM transactions WHERE stream_seq > 0 "  # not the demo's history
            "UNION ALL SELECT stream_seq FROM dead_letters")]
        alerted_twice = int(store.reader.execute(
            "SELECT count(*) - count(DISTINCT transaction_id) FROM alerts").fetchone()[0])
        checkpoint = store.checkpoint(settings.consumer)
    finally:
        store.close()
    expected = set(range(out["first_seq"], out["last_seq"] + 1))
    missing = sorted(expected - set(seqs))
    # Past the checkpoint is the next start's work (its consumer begins at checkpoint + 1):
    # not lost. At or below it and in neither table would be lost for good.
    out.update(status=counts, stored=counts["transactions"],
               dead_lettered=counts["dead_letters"], checkpoint=checkpoint,
               missing=missing[:20], missing_count=len(missing),
               lost=[s for s in missing if s <= checkpoint][:20],
               lost_count=sum(1 for s in missing if s <= checkpoint),
               stored_twice=len(seqs) - len(set(seqs)), alerted_twice=alerted_twice)
    return out


def run_drill(rate: float = 5.0, children: Sequence[str] = CHILDREN, timeout: float = 30.0,
              pause: float = 1.0) -> dict[str, Any]:
    """Kill each of ``children`` (names from :data:`CHILDREN`) of a demo node in turn, with
    ``pause`` seconds between them; each gets ``timeout`` seconds to come back. Returns the
    seconds per child, the clean-stop checks and the accounting of every message."""
    unknown = [c for c in children if c not in CHILDREN]
    if unknown:
        raise ValueError(f"unknown children {unknown}; use some of {', '.join(CHILDREN)}")
    with tempfile.TemporaryDirectory(prefix="branchguard-drill-") as tmp:
        data_dir = Path(tmp) / "node"
        sink = _AlertSink()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHGUARD_")}
        env.update(BRANCHGUARD_NATS_PORT="0", BRANCHGUARD_API_PORT="0",
                   BRANCHGUARD_RUN_API="true", BRANCHGUARD_REPLICATE="true",
                   BRANCHGUARD_ALERTS_CRITICAL=sink.url, BRANCHGUARD_ALERTS_HIGH=sink.url,
                   BRANCHGUARD_ALERTS_WARNING=sink.url)
        settings = load(None, env={}, data_dir=data_dir)
        node = _Node(data_dir, rate, env)
        report: dict[str, Any] = {"rate": rate, "children": {}}
        try:
            node.wait_for(lambda: bool(node.events("node.ready"))
                          and bool(node.events("api.listening")), 180, "node.ready")
            nats_url = str(node.events("node.ready")[0]["nats_url"])
            api_url = f"http://127.0.0.1:{node.events('api.listening')[0]['port']}"
            node.wait_for(lambda: _healthy(api_url), 60, "the API")
            # Steady state first: the demo's half hour of history scored, so each kill
            # happens under the live stream, not during the catch-up.
            caught_up = max(100.0, 2 * rate)
            report["catch_up_seconds"] = round(node.wait_for(
                lambda: _lag(api_url) <= caught_up, 600, "the history scored"), 1)
            for name in children:
                time.sleep(pause)
                report["children"][name] = _kill_one(node, settings, name, nats_url, api_url,
                                                     timeout)
            time.sleep(pause)
            report["zombies"] = zombies(node.process.pid)
            try:
                node.wait_for(lambda: _readyz(api_url)[0] == 200, timeout, "a ready /readyz")
            except (TimeoutError, OSError):
                pass
            try:
                report["readyz"] = dict(zip(("status", "body"), _readyz(api_url)))
            except OSError as exc:
                report["readyz"] = {"status": None, "error": str(exc)}
            stopping_at = len(node.log())
            stop_started = time.monotonic()
            node.process.send_signal(signal.SIGINT)  # what Ctrl-C does
            try:
                code = node.process.wait(90)
            except subprocess.TimeoutExpired:
                code = None
            after = node.log()[stopping_at:]
            report["stop"] = {
                "exit_code": code, "seconds": round(time.monotonic() - stop_started, 2),
                "node_stopped": '"node.stopped"' in after,
                "tracebacks": node.log().count("Traceback"),
                "disconnect_warnings": sum(1 for line in after.splitlines()
                                           if '"nats.disconnected"' in line
                                           and '"WARNING"' in line),
            }
        finally:
            if node.process.poll() is None:
                node.process.kill()
                node.process.wait()
            sink.stop()
        report["accounting"] = _account(settings)
        report["log_tail"] = node.log()[-4000:]
    return report


def format_drill(report: dict[str, Any]) -> str:
    lines = [f"kill -9 of each child of `branchguard run --demo --demo-rate "
             f"{report['rate']:g}` (history scored in {report['catch_up_seconds']} s first):"]
    for name, r in report["children"].items():
        accepting = (f" (the stream took a transaction after {r['stream_accepting_seconds']:.2f}"
                     " s)" if "stream_accepting_seconds" in r else "")
        lines.append(f"  {name:<12} " + (f"back and serving in {r['seconds']:.2f} s{accepting}"
                                          if r["back"] else f"NOT BACK: {r.get('error')}"))
    stop, acc = report["stop"], report["accounting"]
    lines.append(f"zombies: {report['zombies']}; /readyz after: {report['readyz'].get('status')}")
    lines.append(f"stop (SIGINT): exit {stop['exit_code']} in {stop['seconds']:.2f} s, "
                 f"node.stopped {'yes' if stop['node_stopped'] else 'NO'}, "
                 f"{stop['tracebacks']} tracebacks, {stop['disconnect_warnings']} "
                 "nats.disconnected warnings")
    lines.append(f"TX stream {acc['stream_messages']} messages = {acc['stored']} stored + "
                 f"{acc['dead_lettered']} dead-lettered? missing {acc['missing_count']} "
                 f"({acc['lost_count']} at or below the checkpoint {acc['checkpoint']}, lost), "
                 f"stored twice {acc['stored_twice']}, alerted twice {acc['alerted_twice']}")
    return "\n".join(lines)
