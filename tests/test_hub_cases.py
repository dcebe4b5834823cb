"""Branches and a regional hub, end to end (issue 20): two branches, each the embedded
single node (``branchguard run``) whose nats-server is a leaf node of the hub, and the hub's
analyst side (``branchguard hub run``), on real nats-servers, each a real process.

Every alert of both branches reaches the hub's database once, under its branch, through a
hub outage; a case closed at the hub becomes a label at the branch that scored it (and not
at the other); a deny entry added at the hub is applied by both branches' scorers.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import nats
import pytest

from appliance.bench.partition_scorers import ScorerChild, read_only, wait_until
from appliance.bench.throughput import bench_transactions
from appliance.casework.cases import Change, change_case
from appliance.casework.queue import QueueQuery, alert_page
from appliance.feed.terminal import to_message
from appliance.operations.cluster import free_port
from appliance.operations.hub import HubPlan, write_hub_config
from appliance.scoring.lists import add_entry
from appliance.settings import load

from .test_case_flows import query, write
from .test_hub import Hub, leafs

BRANCHES = ("br1", "br2")
START = datetime(2027, 1, 4, tzinfo=timezone.utc)


def publish(url: str, branch: str, seed: int, start: int, count: int) -> list[str]:
    txs = bench_transactions(seed, start + count, START)[start:]
    messages = [to_message(tx, branch) for tx in txs]

    async def main() -> None:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            for m in messages:
                await js.publish(m.subject, m.data, headers={"Nats-Msg-Id": m.msg_id})
        finally:
            await nc.close()

    asyncio.run(main())
    return [tx.transaction_id for tx in txs]


def node_url(child: ScorerChild) -> str | None:
    return next((e["nats_url"] for e in child.events() if e.get("event") == "node.ready"),
                None)


@pytest.mark.timeout(400)
def test_every_branchs_cases_reach_the_hub_and_casework_goes_back(tmp_path: Path) -> None:
    plan = HubPlan(host="127.0.0.1", client_port=free_port(), leaf_port=free_port(),
                   monitor_port=free_port(), store_dir=tmp_path / "hub-store",
                   branches=BRANCHES, public_host="127.0.0.1")
    out = tmp_path / "hub"
    write_hub_config(load(None, env={}), out, plan)
    hub = Hub(out / "hub.conf", tmp_path / "hub-server.log")
    hub.start()
    common = {"BRANCHGUARD_EVENT_TIME_CHECK": "false", "BRANCHGUARD_ALERT_BUDGET": "false",
              "BRANCHGUARD_REPLICATE": "false", "BRANCHGUARD_RUN_API": "false",
              "BRANCHGUARD_NATS_PORT": "0", "BRANCHGUARD_LISTS_REFRESH_SECONDS": "0.5",
              "BRANCHGUARD_LOG_LEVEL": "INFO"}
    branches = {b: ScorerChild.start(b, {**common, "BRANCHGUARD_CONFIG": str(
        out / "branches" / f"{b}.toml"), "BRANCHGUARD_DATA_DIR": str(tmp_path / b)},
        tmp_path, command=("run",)) for b in BRANCHES}
    hub_dir = tmp_path / "hub-node"
    hub_db = hub_dir / "branchguard.db"
    analyst = ScorerChild.start("hub-run", {**common, "BRANCHGUARD_CONFIG": str(
        out / "hub.toml"), "BRANCHGUARD_DATA_DIR": str(hub_dir)}, tmp_path,
        command=("hub", "run"))
    try:
        assert wait_until(lambda: all(node_url(c) for c in branches.values()), 60)
        assert wait_until(lambda: sorted(leafs(plan.monitor_port)) == list(BRANCHES), 30)
        urls = {b: str(node_url(c)) for b, c in branches.items()}
        for i, b in enumerate(BRANCHES):
            publish(urls[b], b, 11 + i, 0, 300)

        def branch_alerts(b: str) -> set[str]:
            return {r[0] for r in query(tmp_path / b / "branchguard.db",
                                        "SELECT transaction_id FROM alerts")}

        def hub_alerts() -> list[tuple[str, str]]:
            return query(hub_db, "SELECT a.transaction_id, t.branch FROM alerts a "
                         "JOIN transactions t USING (transaction_id)")

        assert wait_until(lambda: sum(len(branch_alerts(b)) for b in BRANCHES) > 0
                          and len(hub_alerts()) == sum(len(branch_alerts(b))
                                                       for b in BRANCHES), 90), (
            analyst.log.read_text()[-3000:])

        # The hub stops for a while; both branches keep scoring; nothing is lost or doubled.
        hub.stop()
        for i, b in enumerate(BRANCHES):
            publish(urls[b], b, 11 + i, 300, 200)  # their own servers: no hub needed
        time.sleep(3)
        hub.start()
        assert wait_until(lambda: len(hub_alerts()) == sum(len(branch_alerts(b))
                                                           for b in BRANCHES), 90)
        time.sleep(1.5)
        stored = hub_alerts()
        assert len(stored) == len({t for t, _ in stored})  # each once
        for b in BRANCHES:
            assert {t for t, branch in stored if branch == b} == branch_alerts(b)
        assert query(hub_db, "SELECT count(*) FROM alert_outbox") == [(len(stored),)]
        with read_only(hub_db) as conn:  # the queue's branch filter and column
            for b in BRANCHES:
                page = alert_page(conn, QueueQuery(statuses=(), branch=b, page_size=10_000))
                assert page.total == len(branch_alerts(b))
                assert {a["transaction_id"] for a in page.alerts} == branch_alerts(b)
                assert {a["branch"] for a in page.alerts} == {b}

        # A case closed at the hub becomes a label at its branch, and only there.
        alert_id, tid = query(hub_db, "SELECT a.alert_id, a.transaction_id FROM alerts a "
                              "JOIN transactions t USING (transaction_id) WHERE "
                              "t.branch = 'br2' ORDER BY a.alert_id LIMIT 1")[0]

        def dispose(conn: sqlite3.Connection) -> None:
            change_case(conn, alert_id, Change(version=1, status="INVESTIGATING"), "carol")
            change_case(conn, alert_id, Change(version=2, disposition="false_positive"),
                        "carol")
        write(hub_db, dispose)
        assert wait_until(lambda: query(tmp_path / "br2" / "branchguard.db",
                                        "SELECT label, source FROM labels WHERE "
                                        "transaction_id = ?", tid) == [(0, "analyst:hub/carol")],
                          30), branches["br2"].log.read_text()[-3000:]
        assert query(tmp_path / "br1" / "branchguard.db", "SELECT count(*) FROM labels") == [(0,)]

        # A deny entry added at the hub is applied by both branches' scorers.
        used = [{tx.terminal_id for tx in bench_transactions(11 + i, 700, START)[500:]}
                for i in range(len(BRANCHES))]
        terminal = min(set.intersection(*used))  # a terminal both branches' customers use
        write(hub_db, lambda conn: add_entry(conn, "deny", "terminal", terminal,
                                             "skimmer found", "dave", None))
        for b in BRANCHES:
            assert wait_until(lambda b=b: query(
                tmp_path / b / "branchguard.db", "SELECT owner FROM list_entries WHERE "
                "value = ?", terminal) == [("hub/dave",)], 30)
        time.sleep(1.5)
        later: dict[str, list[str]] = {}
        for i, b in enumerate(BRANCHES):
            txs = bench_transactions(11 + i, 700, START)[500:]
            later[b] = [tx.transaction_id for tx in txs if tx.terminal_id == terminal]
            publish(urls[b], b, 11 + i, 500, 200)
        for b in BRANCHES:
            assert later[b], b  # the terminal is used at each branch

            def declined(b: str = b) -> bool:
                rows = query(tmp_path / b / "branchguard.db", "SELECT decision, reasons "
                             f"FROM transactions WHERE transaction_id IN "
                             f"({', '.join('?' * len(later[b]))})", *later[b])
                return len(rows) == len(later[b]) and all(
                    d == "decline" and "deny_list" in json.loads(r) for d, r in rows)
            assert wait_until(declined, 60), b
    finally:
        analyst.stop()
        for child in branches.values():
            child.stop()
        hub.stop()
