"""Branches and a regional hub, end to end (issue 20): three branches, each the embedded
single node (``branchguard run``) whose nats-server is a leaf node of the hub, and the hub's
analyst side (``branchguard hub run``), on real nats-servers, each a real process; the third
branch dials the hub through a link that is cut for 60 s.

Every alert of every branch reaches the hub's database once, under its branch, through the
cut and through a hub outage, and the hub shows the cut branch's link down meanwhile; a case
closed at the hub becomes a label at the branch that scored it (and nowhere else); a deny
entry added at the hub is applied by every branch's scorer.
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from appliance.bench.partition_scorers import read_only, wait_until
from appliance.bench.throughput import bench_transactions
from appliance.bench.hub import HubSite, publish
from appliance.casework.branch_links import links
from appliance.casework.cases import Change, change_case
from appliance.casework.queue import QueueQuery, alert_page
from appliance.learning.promotion import on_node, promote
from appliance.scoring.registry import Registry
from appliance.scoring.lists import add_entry
from appliance.settings import load

from .test_case_flows import query, write

BRANCHES = ("br1", "br2", "br3")
CUT = "br3"
"""The branch whose link to the hub is cut."""
CUT_SECONDS = 60.0
START = datetime(2027, 1, 4, tzinfo=timezone.utc)


@pytest.mark.timeout(400)
def test_every_branchs_cases_reach_the_hub_and_casework_goes_back(tmp_path: Path) -> None:
    site = HubSite(tmp_path, BRANCHES, {"BRANCHGUARD_LISTS_REFRESH_SECONDS": "0.5"})
    hub_db, link, hub = site.hub_db, site.link, site.server
    branch_alerts = site.branch_alerts
    hub_alerts = site.hub_alerts
    try:
        assert site.wait_ready(60)
        urls = site.urls
        for i, b in enumerate(BRANCHES):
            publish(urls[b], b, 11 + i, 0, 300)
        assert wait_until(lambda: sum(len(branch_alerts(b)) for b in BRANCHES) > 0
                          and site.all_at_hub(), 90), site.analyst.log.read_text()[-3000:]

        with read_only(hub_db) as conn:
            assert wait_until(lambda: [lk["state"] for lk in links(conn)] ==
                              ["connected"] * len(BRANCHES), 10), links(conn)

        # The cut branch's link is down for 60 s; it keeps scoring, and so do the others.
        link.cut()
        cut_at = time.time()
        for i, b in enumerate(BRANCHES):
            publish(urls[b], b, 11 + i, 300, 100)
        with read_only(hub_db) as conn:
            assert wait_until(lambda: {lk["branch"]: lk["state"] for lk in links(conn)}
                              == {"br1": "connected", "br2": "connected", CUT: "down"}, 15)
            down = next(lk for lk in links(conn) if lk["branch"] == CUT)
        assert cut_at - 1 <= down["since"] <= cut_at + 10  # when it went
        assert wait_until(lambda: query(tmp_path / CUT / "branchguard.db",
                                        "SELECT count(*) FROM transactions") == [(400,)], 30)
        pending = set(branch_alerts(CUT)) - {t for t, _ in hub_alerts()}
        assert pending  # scored at the branch, not at the hub yet
        time.sleep(max(0.0, cut_at + CUT_SECONDS - time.time()))
        link.restore()
        assert wait_until(lambda: {t for t, b in hub_alerts() if b == CUT}
                          == set(branch_alerts(CUT)), 60)
        with read_only(hub_db) as conn:
            assert wait_until(lambda: next(lk for lk in links(conn) if lk["branch"] == CUT)
                              ["state"] == "connected", 15)

        # The hub stops for a while; the branches keep scoring; nothing is lost or doubled.
        hub.stop()
        for i, b in enumerate(BRANCHES):
            publish(urls[b], b, 11 + i, 400, 100)  # their own servers: no hub needed
        time.sleep(3)
        hub.start()
        assert wait_until(site.all_at_hub, 90)
        time.sleep(1.5)
        stored = hub_alerts()
        assert len(stored) == len({t for t, _ in stored})  # each once
        for b in BRANCHES:
            assert {t for t, branch in stored if branch == b} == set(branch_alerts(b))
        assert query(hub_db, "SELECT count(*) FROM alert_outbox") == [(len(stored),)]
        with read_only(hub_db) as conn:  # the queue's branch filter and column
            for b in BRANCHES:
                page = alert_page(conn, QueueQuery(statuses=(), branch=b, page_size=10_000))
                assert page.total == len(branch_alerts(b))
                assert {a["transaction_id"] for a in page.alerts} == set(branch_alerts(b))
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
                          30), site.nodes["br2"].log.read_text()[-3000:]
        for b in ("br1", CUT):
            assert query(tmp_path / b / "branchguard.db", "SELECT count(*) FROM labels") == [(0,)]

        # A model promoted at the hub is promoted at every branch, its file checked there.
        hub_settings = site.hub_settings()
        shipped = Registry.of(hub_settings)
        card = {**shipped.card("if-v1"), "version": "if-v1-hub", "stage": "candidate"}
        shipped.register(shipped.locate("if-v1") / "if-v1.onnx", card)
        on_node(hub_settings, lambda conn, reg: promote(conn, reg, "if-v1-hub", "erin",
                                                        "the region's model"))
        for b in BRANCHES:
            here = load(None, env={}, data_dir=tmp_path / b)
            assert wait_until(lambda here=here: Registry.of(here).production() == "if-v1-hub",
                              30), site.nodes[b].log.read_text()[-3000:]
        [(actor, reason)] = query(tmp_path / "br1" / "branchguard.db",
                                  "SELECT actor, json_extract(after, '$.reason') FROM "
                                  "audit_log WHERE action = 'model.promote'")
        assert actor == "hub/erin" and reason == "promoted at hub: the region's model"
        time.sleep(3)  # each scorer looks at its registry every 2 s

        # A deny entry added at the hub is applied by every branch's scorer.
        used = [{tx.terminal_id for tx in bench_transactions(11 + i, 900, START)[700:]}
                for i in range(len(BRANCHES))]
        terminal = min(set.intersection(*used))  # a terminal every branch's customers use
        write(hub_db, lambda conn: add_entry(conn, "deny", "terminal", terminal,
                                             "skimmer found", "dave", None))
        for b in BRANCHES:
            assert wait_until(lambda b=b: query(
                tmp_path / b / "branchguard.db", "SELECT owner FROM list_entries WHERE "
                "value = ?", terminal) == [("hub/dave",)], 30)
        time.sleep(1.5)
        later: dict[str, list[str]] = {}
        for i, b in enumerate(BRANCHES):
            txs = bench_transactions(11 + i, 900, START)[700:]
            later[b] = [tx.transaction_id for tx in txs if tx.terminal_id == terminal]
            publish(urls[b], b, 11 + i, 700, 200)
        for b in BRANCHES:
            assert later[b], b  # the terminal is used at each branch

            def declined(b: str = b) -> bool:
                rows = query(tmp_path / b / "branchguard.db", "SELECT decision, reasons "
                             f"FROM transactions WHERE transaction_id IN "
                             f"({', '.join('?' * len(later[b]))})", *later[b])
                return len(rows) == len(later[b]) and all(
                    d == "decline" and "deny_list" in json.loads(r) for d, r in rows)
            assert wait_until(declined, 60), b
            assert query(tmp_path / b / "branchguard.db", "SELECT DISTINCT model_version FROM "
                         f"transactions WHERE transaction_id IN "
                         f"({', '.join('?' * len(later[b]))})", *later[b]) == [("if-v1-hub",)]

        # Each branch's statistics per minute, at the hub: every minute the branch sent.
        for b in BRANCHES:
            def minutes_match(b: str = b) -> bool:
                sent = query(site.branch_db(b), "SELECT position FROM case_flow_cursors "
                             "WHERE flow = 'minutes'")
                if not sent:
                    return False
                end = (sent[0][0] + 1) * 60.0
                [(here,)] = query(site.branch_db(b), "SELECT count(*) FROM transactions "
                                  "WHERE stored_at < ?", end)
                [(there,)] = query(hub_db, "SELECT coalesce(sum(transactions), 0) FROM "
                                   "branch_minutes WHERE branch = ? AND minute * 60 < ?", b, end)
                return bool(here) and here == there
            assert wait_until(minutes_match, 90), b
    finally:
        site.stop()
