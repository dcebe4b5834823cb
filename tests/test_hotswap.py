"""Hot swap under a running stream: a promotion reaches the running scorer within seconds, no
transaction is lost or scored twice, every verdict names its model, the switch point is
visible in the log and in the stored rows."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path


from appliance.scoring.explain import Explainer
from appliance.scoring.registry import Registry
from appliance.scoring.rules import RULES_VERSION
from appliance.settings import SHIPPED_MODELS_DIR

from .support import publish_in_background, decode, make_transactions, query, read_stream, stored_count, wait_until
from .test_registry import copy_shipped

Node = type


def test_promotion_swaps_the_model_of_a_running_scorer(tmp_path: Path, nats_url: str,
                                                       node_factory: Node) -> None:
    data = tmp_path / "node"
    copy_shipped(data / "models", "m-next")
    node = node_factory(data, nats_url, {"BRANCHGUARD_MODEL_CHECK_SECONDS": "0.3"}).start()
    txs = [item.tx for item in make_transactions(3000, seed=21)]
    publisher = publish_in_background(nats_url, txs, rate=500.0)
    db = data / "branchguard.db"
    wait_until(lambda: stored_count(db) >= 800, message="first part stored")
    promoted_at = time.monotonic()
    Registry(data / "models", SHIPPED_MODELS_DIR, "if-v1").promote("m-next", reason="test")
    wait_until(lambda: '"model.swapped"' in node.log(), timeout=10, message="swap")
    swap_seconds = time.monotonic() - promoted_at
    publisher.join(60)
    wait_until(lambda: stored_count(db) == len(txs), message="all stored")

    rows = query(db, "SELECT transaction_id, stream_seq, model_version, rules_version FROM "
                     "transactions ORDER BY stream_seq")
    assert len(rows) == len(txs) == len({r[0] for r in rows})       # none lost, none twice
    assert {r[3] for r in rows} == {RULES_VERSION}
    old = [r[1] for r in rows if r[2] == "if-v1"]
    new = [r[1] for r in rows if r[2] == "m-next"]
    assert old and new and len(old) + len(new) == len(rows)
    assert max(old) < min(new)                                     # one clean switch point
    swapped = next(json.loads(line) for line in node.log().splitlines()
                   if '"model.swapped"' in line)
    assert swapped["previous"] == "if-v1" and swapped["version"] == "m-next"
    assert swapped["after_stream_seq"] == max(old)
    assert swap_seconds < 10

    # every alert carries its explanation, made by the model that raised it
    # (made when read, from the stored features and the model version: issue 16)
    explainer = Explainer(Registry(data / "models", SHIPPED_MODELS_DIR, "if-v1"))
    conn = sqlite3.connect(db)
    alerts = {tid: explainer.of(conn, tid) for (tid,) in query(
        db, "SELECT transaction_id FROM alerts")}
    conn.close()
    assert alerts and all(e is not None for e in alerts.values())
    versions = {r[0]: r[2] for r in rows}
    for tid, e in alerts.items():
        assert e is not None
        assert e["model_version"] == versions[tid]
        assert e["contributions"] and e["method"]
        stored = json.loads(query(db, "SELECT reasons FROM transactions WHERE "
                                      "transaction_id = ?", [tid])[0][0])
        assert [r["reason"] for r in e["rules"]] == stored

    verdicts = [decode(m.data) for m in read_stream(nats_url, "VERDICTS", expect=len(txs))]
    assert len(verdicts) == len(txs) == len({v["transaction_id"] for v in verdicts})
    by_model = {v["transaction_id"]: v["model_version"] for v in verdicts}
    assert by_model == {r[0]: r[2] for r in rows}
    assert node.stop() == 0
