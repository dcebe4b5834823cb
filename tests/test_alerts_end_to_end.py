"""Through the real scorer: transactions that trip rules become alert messages at a local
receiver, sent by the dispatcher that ``branchguard run`` starts next to the scorer."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from appliance.transaction import Transaction

from .alerting import unrouted
from .receivers import HttpReceiver, wait_for
from .support import query, send, stored_count, wait_until
from .test_pipeline import crafted

Node = type  # the node_factory fixture yields a NodeProcess subclass


@pytest.fixture
def http() -> Iterator[HttpReceiver]:
    receiver = HttpReceiver().start()
    yield receiver
    receiver.stop()


def linked_ids(body: str) -> set[int]:
    return {int(i) for i in re.findall(r"/console/alerts/(\d+)", body)}


def test_alerts_from_the_scorer_arrive_routed_by_severity(
        tmp_path: Path, nats_url: str, node_factory: Node, http: HttpReceiver) -> None:
    env = {f"BRANCHGUARD_ALERTS_{s}": f"json://{http.base}/{s.lower()}"
           for s in ("CRITICAL", "HIGH", "WARNING")}
    # routing is what this tests: fixed thresholds, so the crafted rules alert at several
    # severities (with the budget, soft rules on a new node's cold budget raise none)
    env.update(BRANCHGUARD_ALERT_BUDGET="false",
               BRANCHGUARD_ALERTS_GROUP_WAIT_SECONDS="0.5",
               BRANCHGUARD_ALERTS_DIGEST_INTERVAL_SECONDS="1",
               BRANCHGUARD_ALERTS_POLL_SECONDS="0.1")
    node = node_factory(tmp_path / "node", nats_url, env).start()
    txs = crafted()
    assert send(nats_url, txs) == len(txs)
    db = tmp_path / "node" / "branchguard.db"
    wait_until(lambda: stored_count(db) == len(txs), message="all stored")
    severity = dict(query(db, "SELECT alert_id, severity FROM alerts"))
    by_tid = dict(query(db, "SELECT transaction_id, alert_id FROM alerts"))
    assert {"deviation", "high-value", "combo"} <= set(by_tid)

    def linked() -> set[int]:
        return set().union(*(linked_ids(r.body) for r in http.received))
    wait_for(lambda: linked() == set(severity), timeout=30, message="every alert sent")
    for r in http.received:
        assert {severity[i].lower() for i in linked_ids(r.body)} == {r.path.strip("/")}
        assert r.title.startswith(f"[{r.path.strip('/').upper()}]")
    high_value = next(r for r in http.received if by_tid["high-value"] in linked_ids(r.body))
    assert "7,500.00 EUR" in high_value.title and "A-RICH" in high_value.title
    assert "High amount: amount 7500.00 >= 5000.00" in high_value.body

    # The dispatcher dies (SIGKILL): the node restarts it, and later alerts still arrive.
    (started,) = [json.loads(line) for line in node.log().splitlines()
                  if '"alerts.dispatcher_started"' in line]
    os.kill(started["pid"], signal.SIGKILL)
    wait_for(lambda: node.log().count('"alerts.dispatcher_started"') == 2, timeout=30,
             message="dispatcher restarted")
    (exited,) = [json.loads(line) for line in node.log().splitlines()
                 if '"child.exited"' in line]
    assert exited["child"] == "alerts" and exited["pid"] == started["pid"]
    assert exited["exit_code"] == -signal.SIGKILL and exited["level"] == "ERROR"
    late = [Transaction(transaction_id="late", account_id="A-LATE", amount=8000.0,
                        currency="EUR", timestamp=txs[-1].timestamp + timedelta(minutes=5),
                        terminal_id="T0009", channel="ATM")]
    assert send(nats_url, late) == 1
    wait_until(lambda: query(db, "SELECT count(*) FROM alerts WHERE transaction_id = 'late'")
               == [(1,)], message="late alert stored")
    wait_for(lambda: any("A-LATE" in r.title for r in http.received), timeout=30,
             message="the late alert sent by the restarted dispatcher")

    assert node.stop() == 0
    assert '"alerts.dispatcher_stopped"' in node.log()
    assert query(db, "SELECT count(*) FROM alert_deliveries WHERE state != 'sent'") == [(0,)]


def test_without_destinations_the_node_says_so_and_keeps_the_outbox(
        tmp_path: Path, nats_url: str, node_factory: Node) -> None:
    node = node_factory(tmp_path / "node", nats_url, {"BRANCHGUARD_ALERT_BUDGET": "false"}
                        ).start()
    txs = crafted()
    send(nats_url, txs)
    db = tmp_path / "node" / "branchguard.db"
    wait_until(lambda: stored_count(db) == len(txs), message="all stored")
    assert node.stop() == 0
    assert node.log().count('"alerts.not_dispatched"') == 1
    alerts = query(db, "SELECT count(*) FROM alerts")[0][0]
    assert alerts >= 3
    assert unrouted(db) == alerts
