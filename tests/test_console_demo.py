"""``branchguard run --demo`` gives the console a demo user and prints its password once; a
restarted demo publishes only the history it missed."""

from __future__ import annotations

import io
import itertools
import re
import time
from pathlib import Path

from appliance.casework import users
from appliance.change import connect_writer
from appliance.operations.runner import (DEMO_USER, DEMO_WARMUP_SECONDS, announce_demo_user,
                                         demo_stream, demo_warmup)
from appliance.settings import load
from appliance.store import open_db


def test_demo_password_is_printed_once_and_replaced_each_start(tmp_path: Path) -> None:
    settings = load(None, env={}, data_dir=tmp_path / "node", api_port=8123)
    open_db(settings.db_path).close()
    out = io.StringIO()
    first = announce_demo_user(settings, out)
    assert first is not None
    line = out.getvalue()
    assert line.count(first) == 1 and "http://127.0.0.1:8123/console/" in line
    assert re.search(rf"user: {DEMO_USER}\b", line)
    conn = connect_writer(settings.db_path).conn
    demo = users.authenticate(conn, DEMO_USER, first)
    assert demo is not None and demo.role == "supervisor"
    second = announce_demo_user(settings, io.StringIO())
    assert second is not None and second != first
    assert users.authenticate(conn, DEMO_USER, first) is None
    assert users.authenticate(conn, DEMO_USER, second) is not None


def test_no_demo_user_without_the_console(tmp_path: Path) -> None:
    settings = load(None, env={}, data_dir=tmp_path / "node", console_enabled=False)
    open_db(settings.db_path).close()
    out = io.StringIO()
    assert announce_demo_user(settings, out) is None and out.getvalue() == ""
    assert not users.exists(connect_writer(settings.db_path).conn, DEMO_USER)


def test_a_restarted_demo_publishes_only_the_gap_since_its_newest_transaction() -> None:
    now = 1_800_000_000.0
    assert demo_warmup(None, now) == DEMO_WARMUP_SECONDS            # a new node
    assert demo_warmup(now - 90.0, now) == 90.0                    # restarted 90 s later
    assert demo_warmup(now - 86_400.0, now) == DEMO_WARMUP_SECONDS  # a day later: capped
    assert demo_warmup(now + 30.0, now) == 0.0                      # stored ahead of the clock
    started = time.time()
    first = [tx.timestamp.timestamp() for tx in
             itertools.islice(demo_stream(50.0, "BR001", demo_warmup(started - 90.0, started)),
                              200)]
    assert started - 91.0 <= min(first) <= started - 80.0  # the 90 s missed, not half an hour
