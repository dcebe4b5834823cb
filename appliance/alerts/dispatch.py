"""``branchguard alerts run``: the dispatcher, a process of its own that delivers the outbox.

The scorer never talks to a chat or mail server: it only writes outbox rows with its alerts,
so a slow or dead destination cannot slow scoring. This process

- routes new outbox rows to destinations by severity (main thread, every ``alerts_poll_seconds``);
- runs one worker thread per destination, so a slow one delays no other: each picks the next
  message (a WARNING digest when one is due, else the first burst its throttle lets out), sends
  it through Apprise, and marks its alerts sent in a transaction of its own right after the
  destination accepted it. A failure backs the destination off (exponential, with jitter);
  alerts still not accepted ``alerts_max_age_seconds`` after they were raised are marked failed.

Crash semantics: at least once. A crash after a destination accepted a message but before it
was marked sends that message once more after the restart; nothing is lost at any point.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType

from .. import logs
from ..settings import Settings
from .grouping import Burst, Throttle, bursts
from .messages import Message, digest, grouped, probe_message
from .outbox import ROUTE_BATCH, Outbox
from .pacing import Backoff, RateLimit
from .routing import Destination, destinations, routes

log = logs.get("appliance.dispatch")
BATCH = 2000
"""Most alerts read for one message; a larger burst goes out in several."""
DIGEST_BATCH = 20_000
"""Most alerts in one digest (it lists only the first few, but counts them all)."""

_apprise_said = threading.local()


class _AppriseLog(logging.Handler):
    """Apprise's own log lines, re-logged as JSON events; the last warning of a thread is
    kept as the reason a send failed (Apprise's ``notify`` only returns a bool)."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            _apprise_said.last = text
            log.warning("apprise.log", txn_id=None, message=text)


def _route_apprise_logs() -> None:
    apprise_logger = logging.getLogger("apprise")
    apprise_logger.handlers[:] = [_AppriseLog()]
    apprise_logger.setLevel(logging.WARNING)
    apprise_logger.propagate = False


def send(dest: Destination, message: Message) -> str | None:
    """Send one message; None when the destination accepted it, else why not."""
    _apprise_said.last = None
    try:
        ok = dest.service.notify(body=message.body, title=message.title,
                                 notify_type=_notify_type(message.severity))
    except Exception as exc:  # a plugin bug must not stop the other alerts
        return f"{type(exc).__name__}: {exc}"
    return None if ok else (getattr(_apprise_said, "last", None) or "not accepted")


def _notify_type(severity: str) -> str:
    return {"CRITICAL": "failure", "HIGH": "warning", "WARNING": "warning"}.get(severity,
                                                                                 "info")


class Worker(threading.Thread):
    """Delivers to one destination until ``stop`` is set."""

    def __init__(self, dest: Destination, settings: Settings, stop: threading.Event) -> None:
        super().__init__(name=f"alerts-{dest.key}", daemon=True)
        self.dest = dest
        self.settings = settings
        self.stop_event = stop
        self.backoff = Backoff(settings.alerts_retry_initial_seconds,
                               settings.alerts_retry_max_seconds)
        self.rate = RateLimit(settings.alerts_rate_per_minute)
        self.throttle = Throttle(settings.alerts_group_wait_seconds,
                                 settings.alerts_group_interval_seconds)
        self.error: BaseException | None = None
        self._next_look = 0.0

    def run(self) -> None:
        outbox = Outbox(self.settings.db_path)
        try:
            while not self.stop_event.is_set():
                wait = self.step(outbox, time.time())
                self.stop_event.wait(wait)
        except BaseException as exc:  # crash-only: the process stops, the restart resumes
            self.error = exc
            log.error("alerts.worker_failed", exc_info=True, txn_id=None,
                      destination=self.dest.label)
            self.stop_event.set()
        finally:
            outbox.close()

    def step(self, outbox: Outbox, now: float) -> float:
        """Send at most one message; returns seconds to wait before the next step."""
        poll = self.settings.alerts_poll_seconds
        ready_at = max(self.backoff.next_at, self.rate.next_at(now), self._next_look)
        if ready_at > now:
            return min(ready_at - now, poll)
        if not outbox.anything_due(self.dest.key, now):
            return poll
        picked = self._pick(outbox, now)
        if picked is None:
            return poll
        message, burst = picked
        error = send(self.dest, message)
        if error is None:
            outbox.mark_sent(self.dest.key, message.alert_ids)
            self.backoff.succeeded()
            self.rate.record(now)
            if burst is not None:
                self.throttle.sent(burst, now)
            log.info("alert.sent", txn_id=None, destination=self.dest.label,
                     alerts=len(message.alert_ids), first_alert_id=message.alert_ids[0],
                     severity=message.severity)
            return 0.0
        expired = outbox.mark_attempt_failed(self.dest.key, message.alert_ids, error,
                                             self.settings.alerts_max_age_seconds)
        wait = self.backoff.failed(time.time())
        log.warning("alert.send_failed", txn_id=None, destination=self.dest.label,
                    alerts=len(message.alert_ids), error=error, retry_in=round(wait, 2),
                    failures=self.backoff.failures)
        if expired:
            log.warning("alert.failed", txn_id=None, destination=self.dest.label,
                        alerts=len(expired), first_alert_id=expired[0],
                        max_age_seconds=self.settings.alerts_max_age_seconds)
        return min(wait, poll)

    def _pick(self, outbox: Outbox, now: float) -> tuple[Message, Burst | None] | None:
        """The next message: a due digest first, else the first burst its throttle lets
        out; when more bursts are ready than the rate limit has messages left this minute,
        all of them as one (so a busy minute never builds a backlog that cannot drain).
        With nothing sendable, no second look before the earliest time one could be."""
        console = self.settings.console_url
        due = outbox.pending(self.dest.key, digest=True, due_by=now, limit=DIGEST_BATCH)
        if due:
            return digest(due, console), None
        pending = outbox.pending(self.dest.key, digest=False, due_by=None, limit=BATCH)
        ready, earliest = [], float("inf")
        for burst in bursts(pending):
            at = self.throttle.sendable_at(burst)
            if at <= now:
                ready.append(burst)
            earliest = min(earliest, at)
        if not ready:
            # a burst not read yet starts now at the earliest, so cannot go out before this:
            self._next_look = min(earliest, now + self.settings.alerts_group_wait_seconds)
            return None
        if len(ready) > self.rate.remaining(now):
            merged = Burst(sorted((a for b in ready for a in b.alerts),
                                  key=lambda a: a.alert_id),
                           set().union(*(b.keys for b in ready)))
            return grouped(merged.alerts, console), merged
        return grouped(ready[0].alerts, console), ready[0]


@dataclass(frozen=True)
class ProbeResult:
    label: str
    error: str | None


def send_test(settings: Settings) -> list[ProbeResult]:
    """``branchguard alerts test``: one test message to each configured destination."""
    _route_apprise_logs()
    message = probe_message(settings.branch, settings.console_url)
    return [ProbeResult(d.label, send(d, message)) for d in destinations(settings)]


def run_dispatcher(settings: Settings, stop: threading.Event | None = None) -> int:
    """Deliver the outbox until SIGINT/SIGTERM (or ``stop``); returns the exit code."""
    stop = stop or threading.Event()
    dests = destinations(settings)
    _route_apprise_logs()
    outbox = Outbox(settings.db_path)
    outbox.register({d.key: d.label for d in dests})
    table = routes(dests)
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
    if not dests:
        log.warning("alerts.no_destinations", txn_id=None,
                    hint="set alerts_critical / alerts_high / alerts_warning; alerts are "
                         "marked routed to nowhere")
    workers = [Worker(d, settings, stop) for d in dests]
    log.info("alerts.dispatcher_started", txn_id=None, pid=os.getpid(),
             db=str(settings.db_path),
             destinations=[{"label": d.label, "severities": sorted(d.severities)}
                           for d in dests])
    for w in workers:
        w.start()
    try:
        while not stop.is_set():
            now = time.time()
            # Only while some destination can take messages: with every one backing off
            # (a dead mail server), the dispatcher writes nothing, so it never holds the
            # write lock the scorer needs for work that cannot be sent anyway.
            routed = (outbox.route(table, settings.alerts_digest_interval_seconds)
                      if not workers or any(w.backoff.next_at <= now for w in workers) else 0)
            if routed < ROUTE_BATCH:  # else a backlog: route the next part at once
                stop.wait(settings.alerts_poll_seconds)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30.0)
        outbox.close()
        log.info("alerts.dispatcher_stopped", txn_id=None)
    return 1 if any(w.error is not None for w in workers) else 0

