"""Each sub-command, run as a user runs it, against real processes."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

from .support import query, stored_count, wait_until

Node = type


def branchguard(*args: str, env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_simulate_publishes_to_a_running_node_and_keeps_labels_apart(
        tmp_path: Path, nats_url: str, node_factory: Node) -> None:
    node_factory(tmp_path / "node", nats_url, {}).start()
    labels = tmp_path / "labels.csv"
    result = branchguard("simulate", "--nats-url", nats_url, "--count", "300", "--rate", "0",
                         "--labels", str(labels))
    assert result.returncode == 0, result.stderr
    assert "published 300 transactions" in result.stdout
    db = tmp_path / "node" / "branchguard.db"
    wait_until(lambda: stored_count(db) == 300, message="simulated transactions stored")
    with labels.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 300 and set(rows[0]) == {"transaction_id", "label", "typology"}
    stored = {r[0] for r in query(db, "SELECT transaction_id FROM transactions")}
    assert {r["transaction_id"] for r in rows} == stored

    status = branchguard("status", "--data-dir", str(tmp_path / "node"))
    assert status.returncode == 0
    counts = json.loads(status.stdout)
    assert counts["transactions"] == 300 and counts["dead_letters"] == 0


def test_simulate_replays_a_reference_system_csv(tmp_path: Path, nats_url: str,
                                                 node_factory: Node) -> None:
    node_factory(tmp_path / "node", nats_url, {}).start()
    source = tmp_path / "reference.csv.gz"
    with gzip.open(source, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["transaction_id", "account_id", "timestamp", "amount", "merchant_category",
                    "location", "is_fraud"])
        for i in range(40):
            w.writerow([f"R{i}", f"ACC{i % 4}", f"2024-01-01T10:{i:02d}:00", "12.50",
                        "Gambling" if i == 39 else "Grocery", "Tallinn" if i == 39 else "Riga",
                        int(i == 39)])
    result = branchguard("simulate", "--nats-url", nats_url, "--csv", str(source), "--rate", "0",
                         "--count", "0")
    assert result.returncode == 0, result.stderr
    db = tmp_path / "node" / "branchguard.db"
    wait_until(lambda: stored_count(db) == 40, message="replayed rows stored")
    reasons = query(db, "SELECT reasons FROM transactions WHERE transaction_id = 'R39'")[0][0]
    assert "suspicious_combo" in reasons  # Gambling away from the account's usual location
    columns = [r[1] for r in query(db, "PRAGMA table_info(transactions)")]
    assert "is_fraud" not in columns and "label" not in columns


def test_train_writes_a_model_the_node_can_serve(tmp_path: Path) -> None:
    out = tmp_path / "models"
    result = branchguard("train", "--count", "3000", "--version", "test-v1", "--out-dir",
                         str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metrics"]["onnx_vs_sklearn_max_abs_diff"] < 1e-5
    card = json.loads((out / "test-v1.json").read_text())
    assert card["version"] == "test-v1" and card["training"]["rows"] == 2400
    check = branchguard("settings", env={"BRANCHGUARD_MODELS_DIR": str(out),
                                         "BRANCHGUARD_MODEL_VERSION": "test-v1"})
    assert f"models_dir = {out}" in check.stdout


def test_bad_settings_exit_2_with_the_field_and_a_hint(tmp_path: Path) -> None:
    result = branchguard("status", "--data-dir", str(tmp_path),
                         env={"BRANCHGUARD_BATCH_SIZE": "0"})
    assert result.returncode == 2
    assert "batch_size" in result.stderr and "hint:" in result.stderr
    missing = branchguard("run", "--data-dir", str(tmp_path), "--nats-url", "nats://x:1",
                          env={"BRANCHGUARD_MODEL_VERSION": "nope"})
    assert missing.returncode == 2 and "model not found" in missing.stderr


def test_status_of_a_missing_database_is_an_error_not_zeros(tmp_path: Path) -> None:
    result = branchguard("status", "--data-dir", str(tmp_path / "typo"))
    assert result.returncode == 2 and "no node database here" in result.stderr
    assert not (tmp_path / "typo").exists()


def test_train_never_overwrites_a_model_without_force(tmp_path: Path) -> None:
    args = ("train", "--count", "1500", "--version", "same", "--data-dir", str(tmp_path))
    assert branchguard(*args).returncode == 0
    assert (tmp_path / "models" / "same.onnx").exists()  # default: <data_dir>/models
    again = branchguard(*args)
    assert again.returncode == 2 and "--force" in again.stderr
    assert branchguard(*args, "--force").returncode == 0


def test_an_unreachable_nats_is_a_clear_error(tmp_path: Path) -> None:
    result = branchguard("simulate", "--nats-url", "nats://127.0.0.1:1", "--count", "5",
                         timeout=60)
    assert result.returncode == 2
    assert "cannot connect to NATS at nats://127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_embedded_nats_server_dies_with_a_killed_node(tmp_path: Path) -> None:
    import signal
    import time

    log = (tmp_path / "run.log").open("wb")
    node = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--quiet", "--data-dir",
                             str(tmp_path / "node")], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "BRANCHGUARD_NATS_PORT": "0",
                                 "BRANCHGUARD_API_PORT": "0"})
    try:
        wait_until(lambda: '"node.ready"' in (tmp_path / "run.log").read_text(), timeout=60,
                   message="node ready")
        conf = str((tmp_path / "node" / "nats").resolve())
        assert subprocess.run(["pgrep", "-f", conf], capture_output=True).stdout
        node.send_signal(signal.SIGKILL)
        node.wait()
        deadline = time.monotonic() + 10
        while subprocess.run(["pgrep", "-f", conf], capture_output=True).stdout:
            assert time.monotonic() < deadline, "nats-server outlived the killed node"
            time.sleep(0.1)
    finally:
        if node.poll() is None:
            node.kill()
        log.close()
