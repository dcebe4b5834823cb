"""Shadow scoring: a shadow model scores the same live batches; its scores are stored and
compared, and never drive a decision, an alert or a published verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import cli
from appliance.scoring.labels import import_labels, write_label_file
from appliance.scoring.registry import Registry
from appliance.settings import SHIPPED_MODELS_DIR

from .support import decode, make_transactions, query, read_stream, send, stored_count, wait_until
from .test_registry import copy_shipped

Node = type


def test_shadow_scores_are_stored_and_never_acted_on(tmp_path: Path, nats_url: str,
                                                      node_factory: Node) -> None:
    data = tmp_path / "node"
    copy_shipped(data / "models", "paranoid")
    card_path = data / "models" / "paranoid.json"
    card = json.loads(card_path.read_text())
    card["calibration"]["risk"] = [0.95] * len(card["calibration"]["risk"])  # declines all
    card_path.write_text(json.dumps(card))
    registry = Registry(data / "models", SHIPPED_MODELS_DIR, "if-v1")
    registry.set_stage("paranoid", "shadow")
    node = node_factory(data, nats_url, {"BRANCHGUARD_MODEL_CHECK_SECONDS": "0.2"}).start()
    wait_until(lambda: '"model.shadowing"' in node.log(), timeout=10, message="shadow loaded")
    items = make_transactions(1500, seed=8)
    assert send(nats_url, [i.tx for i in items]) == len(items)
    db = data / "branchguard.db"
    wait_until(lambda: stored_count(db) == len(items), message="all stored")

    shadow = query(db, "SELECT transaction_id, model_version, decision FROM shadow_scores")
    assert len(shadow) == len(items)
    assert {r[1] for r in shadow} == {"paranoid"} and {r[2] for r in shadow} == {"decline"}
    live = dict(query(db, "SELECT transaction_id, decision FROM transactions"))
    assert set(live.values()) != {"decline"}                   # live decisions are production's
    alerts = {r[0] for r in query(db, "SELECT transaction_id FROM alerts")}
    assert alerts == {tid for tid, d in live.items() if d != "approve"}
    verdicts = [decode(m.data) for m in read_stream(nats_url, "VERDICTS", expect=len(items))]
    assert len(verdicts) == len(items)
    assert {v["model_version"] for v in verdicts} == {"if-v1"}
    assert node.stop() == 0

    labels = tmp_path / "labels.csv"
    write_label_file(labels, [(i.tx.transaction_id, int(i.fraud), i.tx.timestamp.timestamp())
                              for i in items])
    import_labels(db, labels)
    result = CliRunner().invoke(cli.cli, ["evaluate", "--compare", "--data-dir", str(data),
                                          "--resamples", "20"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert "live (if-v1) on the 1500 shadowed by paranoid" in lines[1]
    assert "shadow paranoid" in lines[2]
    assert "shadow paranoid − live (paired)" in lines[3]
    alerts_per_day = [float(line.rstrip(" |").rsplit("|", 1)[1]) for line in lines[1:]]
    assert alerts_per_day[1] > alerts_per_day[0]  # the shadow would have alerted on everything
    assert alerts_per_day[2] == pytest.approx(alerts_per_day[1] - alerts_per_day[0], abs=0.15)
