"""Supervision in ``branchguard run``: every child killed with SIGKILL under the demo stream
comes back and serves again, nothing is lost or stored twice, and the stop after it is clean
(the drill of ``branchguard bench children``, on the real node)."""

from __future__ import annotations

import sys

import pytest

from appliance.bench.children import CHILDREN, run_drill


@pytest.mark.timeout(400)
def test_each_killed_child_comes_back_and_no_transaction_is_lost_or_stored_twice() -> None:
    report = run_drill(rate=10.0, timeout=60.0, pause=0.5)
    tail = report["log_tail"]
    for name in CHILDREN:
        assert report["children"][name]["back"], f"{name}: {report['children'][name]}\n{tail}"
    sys.stderr.write("seconds back: " + ", ".join(
        f"{n} {r['seconds']}" for n, r in report["children"].items()) + "\n")
    assert report["zombies"] == 0
    assert report["readyz"]["status"] == 200, report["readyz"]
    stop = report["stop"]
    assert stop["exit_code"] == 0 and stop["node_stopped"], f"{stop}\n{tail}"
    assert stop["tracebacks"] == 0 and stop["disconnect_warnings"] == 0, f"{stop}\n{tail}"
    accounting = report["accounting"]
    assert accounting["missing_count"] == 0, accounting
    assert accounting["stored_twice"] == 0 and accounting["alerted_twice"] == 0, accounting
    assert accounting["stream_messages"] == \
        accounting["stored"] + accounting["dead_lettered"], accounting
