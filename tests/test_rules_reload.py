"""A rules deploy reaches a running scorer (real nats-server, ``branchguard run``): audited,
switched between two batches, every verdict naming the rules file that judged it, and the
new rules' typologies firing on the transactions after the switch."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

from click.testing import CliRunner

from appliance import cli
from appliance.scoring.rulebook import SHIPPED_RULES
from appliance.transaction import Transaction

from .support import publish_in_background, make_transactions, query, send, stored_count, wait_until

Node = type


def test_deploy_reaches_a_running_scorer(tmp_path: Path, nats_url: str,
                                         node_factory: Node) -> None:
    data = tmp_path / "node"
    node = node_factory(data, nats_url, {"BRANCHGUARD_MODEL_CHECK_SECONDS": "0.3"}).start()
    txs = [item.tx for item in make_transactions(2000, seed=23)]
    publisher = publish_in_background(nats_url, txs, rate=400.0)
    db = data / "branchguard.db"
    wait_until(lambda: stored_count(db) >= 500, message="first part stored")
    # a burst of 3 in 20 s is nothing to the shipped rules (6 in 60 s), a burst to these
    candidate = tmp_path / "rules-v3.toml"
    candidate.write_text(SHIPPED_RULES.read_text()
                         .replace('version = "rules-v2"', 'version = "rules-v3"')
                         .replace("count = 6", "count = 3"))
    out = CliRunner().invoke(cli.cli, ["rules", "deploy", str(candidate), "--data-dir",
                                       str(data), "--reason", "bursts of three"])
    assert out.exit_code == 0, out.output
    assert "deployed rules-v3 (was rules-v2)" in out.output
    deployed_at = time.monotonic()
    wait_until(lambda: '"rules.swapped"' in node.log(), timeout=10, message="rules swap")
    assert time.monotonic() - deployed_at < 10
    publisher.join(60)
    wait_until(lambda: stored_count(db) == len(txs), message="all stored")

    late = txs[-1].timestamp + timedelta(hours=1)
    burst = [Transaction(transaction_id=f"burst-{k}", account_id="BURST1", amount=30.0,
                         currency="EUR", timestamp=late + timedelta(seconds=10 * k),
                         terminal_id=txs[0].terminal_id, channel="POS") for k in range(4)]
    send(nats_url, burst)
    wait_until(lambda: stored_count(db) == len(txs) + len(burst), message="burst stored")

    rows = query(db, "SELECT stream_seq, rules_version FROM transactions ORDER BY stream_seq")
    old = [seq for seq, version in rows if version == "rules-v2"]
    new = [seq for seq, version in rows if version == "rules-v3"]
    assert old and new and len(old) + len(new) == len(rows)
    assert max(old) < min(new)                               # one clean switch point
    reasons = {tid: json.loads(r) for tid, r in query(
        db, "SELECT transaction_id, reasons FROM transactions WHERE account_id = 'BURST1'")}
    assert [("velocity_burst" in reasons[f"burst-{k}"]) for k in range(4)] == [
        False, False, True, True]
    detail = query(db, "SELECT details FROM transactions WHERE transaction_id = 'burst-2'")
    assert ("3 transactions from this account within 60 s (threshold: 3 within 60 s)"
            in json.loads(detail[0][0]))
    # a hard rule: its transaction is an alert with the rule's sentence
    assert query(db, "SELECT COUNT(*) FROM alerts WHERE transaction_id IN "
                     "('burst-2', 'burst-3')")[0][0] == 2

    (entry,) = query(db, "SELECT actor, action, subject, after FROM audit_log WHERE action = "
                         "'rules.deploy'")
    assert entry[1:3] == ("rules.deploy", "rules:rules-v3")
    assert entry[0].startswith("cli:")
    assert json.loads(entry[3])["reason"] == "bursts of three"
    swapped = next(json.loads(line) for line in node.log().splitlines()
                   if '"rules.swapped"' in line)
    assert (swapped["previous"], swapped["version"]) == ("rules-v2", "rules-v3")
    assert node.stop() == 0
