"""Dead letters read and re-submitted as a user does, against the real node: what the scorer
refused is listed and shown with its reason, subject, stream sequence, time and the body
exactly as sent; one is re-submitted after a fix (audited, stored once, not twice by
accident); a body the contract still refuses, a truncated one or an unknown sequence is
refused with the reason, and a publish that fails is recorded and may be retried."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from appliance.audit import verify
from appliance.casework.deadletters import listing, printable, show
from appliance.store import DeadLetter, Store
from appliance.transaction import MAX_MESSAGE_BYTES, encode, subject_for

from .conftest import NodeProcess
from .support import make_transactions, query, send_raw, stored_count, wait_until

XSS = "<script>window.__xss = 1</script>"


def branchguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ})


def dead_count(db: Path) -> int:
    return int(query(db, "SELECT count(*) FROM dead_letters")[0][0]) if db.exists() else 0


@pytest.fixture
def refused(tmp_path: Path, nats_url: str, node_factory: type[NodeProcess]
            ) -> tuple[Path, dict[str, tuple[str, bytes]]]:
    """A running node that refused four messages: name -> (subject, body as sent)."""
    data_dir = tmp_path / "node"
    node_factory(data_dir, nats_url, {}).start()
    tx = make_transactions(1, seed=21)[0].tx
    good_subject = subject_for("BR001", tx)
    wrong_account = msgspec.structs.replace(tx, transaction_id="DLQ-FIX-1",
                                            account_id="A-OTHER")
    sent = {
        "bad json": (good_subject, b'{"transaction_id": "X1", ' + XSS.encode()),
        "mismatch": (good_subject, encode(wrong_account)),
        "binary": (good_subject, b"\xff\xfe\x00garbage\x80"),
        "oversize": (good_subject, b"x" * (MAX_MESSAGE_BYTES + 808)),
    }
    assert send_raw(nats_url, [(s, b, f"raw-{name}") for name, (s, b) in sent.items()])
    db = data_dir / "branchguard.db"
    wait_until(lambda: dead_count(db) == 4, message="four dead letters")
    return data_dir, sent


def test_dead_letters_are_listed_and_shown_with_their_bodies(
        refused: tuple[Path, dict[str, tuple[str, bytes]]]) -> None:
    data_dir, sent = refused
    result = branchguard("deadletters", "list", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["stream_seq"] for r in rows] == sorted((r["stream_seq"] for r in rows),
                                                     reverse=True)  # newest first
    by_kind = dict(zip(sent, sorted(rows, key=lambda r: r["stream_seq"])))  # in sent order
    for name, (subject, body) in sent.items():
        row = by_kind[name]
        assert row["subject"] == subject and row["size"] == len(body)
        assert row["received_at"].startswith("20") and row["reason"]
        assert row["body_recorded"] and not row["resubmitted"]
    assert by_kind["bad json"]["reason"].startswith("bad json")
    assert by_kind["bad json"]["body"] == sent["bad json"][1].decode()  # as sent, unescaped
    assert by_kind["mismatch"]["reason"].startswith("subject does not match")
    assert by_kind["mismatch"]["body"] == sent["mismatch"][1].decode()
    assert by_kind["binary"]["body"] is None
    assert base64.b64decode(by_kind["binary"]["body_base64"]) == sent["binary"][1]
    assert by_kind["oversize"]["truncated"]
    assert by_kind["oversize"]["body"] == "x" * MAX_MESSAGE_BYTES

    only = branchguard("deadletters", "list", "--data-dir", str(data_dir), "--reason",
                       "OVERSIZE", "--no-bodies")
    assert [json.loads(line)["stream_seq"] for line in only.stdout.splitlines()] == \
        [by_kind["oversize"]["stream_seq"]]
    assert "body" not in json.loads(only.stdout)

    one = branchguard("deadletters", "show", str(by_kind["mismatch"]["stream_seq"]),
                      "--data-dir", str(data_dir))
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["body"] == sent["mismatch"][1].decode()

    missing = branchguard("deadletters", "show", "999999", "--data-dir", str(data_dir))
    assert missing.returncode == 2
    assert "no dead letter has this stream sequence" in missing.stderr


def test_a_fixed_dead_letter_is_resubmitted_once_audited_and_scored(
        refused: tuple[Path, dict[str, tuple[str, bytes]]], nats_url: str,
        tmp_path: Path) -> None:
    data_dir, sent = refused
    db = data_dir / "branchguard.db"
    seqs = {r[1]: r[0] for r in query(db, "SELECT stream_seq, reason FROM dead_letters")}
    mismatch = next(seq for reason, seq in seqs.items() if reason.startswith("subject"))
    oversize = next(seq for reason, seq in seqs.items() if reason.startswith("oversize"))
    common = ("--data-dir", str(data_dir), "--nats-url", nats_url)
    before = stored_count(db)

    # as stored, the contract still refuses it: nothing is published, nothing recorded
    as_is = branchguard("deadletters", "resubmit", str(mismatch), *common)
    assert as_is.returncode == 2
    assert "the contract still refuses it: subject does not match" in as_is.stderr
    cut = branchguard("deadletters", "resubmit", str(oversize), *common)
    assert cut.returncode == 2 and f"only the first {MAX_MESSAGE_BYTES} of" in cut.stderr
    assert query(db, "SELECT count(*) FROM dead_letter_resubmissions")[0][0] == 0

    # corrected (the account the subject names), it goes through the scorer
    fixed = json.loads(sent["mismatch"][1])
    subject_account = sent["mismatch"][0].rsplit(".", 1)[1]
    fixed["account_id"] = subject_account
    body = tmp_path / "fixed.json"
    body.write_text(json.dumps(fixed))
    done = branchguard("deadletters", "resubmit", str(mismatch), "--body", str(body), *common)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["attempt"] == 1 and outcome["edited"] and outcome["tx_stream_seq"] > 0
    wait_until(lambda: stored_count(db) == before + 1, message="the re-submission scored")
    assert query(db, "SELECT account_id, stream_seq FROM transactions WHERE transaction_id = "
                 "'DLQ-FIX-1'") == [(subject_account, outcome["tx_stream_seq"])]

    # not twice by accident; on purpose, the node still stores it once
    twice = branchguard("deadletters", "resubmit", str(mismatch), "--body", str(body), *common)
    assert twice.returncode == 2 and "already re-submitted by cli:" in twice.stderr
    again = branchguard("deadletters", "resubmit", str(mismatch), "--body", str(body),
                        "--again", *common)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["attempt"] == 2
    wait_until(lambda: int(query(db, "SELECT max(stream_seq) FROM checkpoints")[0][0])
               >= json.loads(again.stdout)["tx_stream_seq"], message="the second one handled")
    assert query(db, "SELECT count(*) FROM transactions WHERE transaction_id = "
                 "'DLQ-FIX-1'")[0][0] == 1

    shown = json.loads(branchguard("deadletters", "show", str(mismatch), "--data-dir",
                                   str(data_dir)).stdout)
    assert shown["resubmitted"] and [r["attempt"] for r in shown["resubmissions"]] == [1, 2]
    entries = query(db, "SELECT actor, action, subject, after FROM audit_log ORDER BY seq")
    assert [(e[1], e[2]) for e in entries] == [("dead_letter.resubmit",
                                               f"dead_letter:{mismatch}")] * 2
    assert entries[0][0].startswith("cli:")
    assert json.loads(entries[0][3])["transaction_id"] == "DLQ-FIX-1"
    conn = sqlite3.connect(db)
    assert verify(conn).broken_seq is None
    conn.close()


def test_a_failed_publish_is_recorded_and_may_be_retried(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    store = Store.open(data_dir / "branchguard.db")
    tx = make_transactions(1, seed=5)[0].tx
    body = encode(tx)
    store.save_batch([], [DeadLetter(7, subject_for("BR001", tx), "scoring failed: boom",
                                     len(body), body)], "scorer", 7)
    store.close()
    dead = ("--data-dir", str(data_dir), "--nats-url", "nats://127.0.0.1:1")
    first = branchguard("deadletters", "resubmit", "7", *dead)
    assert first.returncode == 2 and "not re-submitted" in first.stderr
    shown = json.loads(branchguard("deadletters", "show", "7", "--data-dir",
                                   str(data_dir)).stdout)
    assert not shown["resubmitted"]
    assert shown["resubmissions"][0]["error"] and shown["resubmissions"][0]["tx_stream_seq"] \
        is None
    second = branchguard("deadletters", "resubmit", "7", *dead)  # no --again needed
    assert second.returncode == 2 and "already re-submitted" not in second.stderr


def test_old_dead_letters_without_a_body_still_read(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "branchguard.db")
    store.save_batch([], [DeadLetter(3, "tx.BR001.T1.A1", "bad json: eof", 12)], "scorer", 3)
    conn = store.reader.conn
    letter = show(conn, 3)
    assert letter.body is None and letter.as_dict()["body_recorded"] is False
    assert [d.stream_seq for d in listing(conn)] == [3]
    store.close()


def test_hidden_characters_are_written_out() -> None:
    assert printable("pay\u202eevil\x00\x07 ok\nnext") == "pay\\u202eevil\\u0000\\u0007 ok\nnext"
