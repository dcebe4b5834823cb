"""``branchguard run --demo`` gives the console a demo user and prints its password once; a
restarted demo's history is tested in tests/test_demo.py."""

from __future__ import annotations

import io
import itertools
import re
import time
from pathlib import Path

from appliance.casework import users
from appliance.change import connect_writer
from appliance.operations.runner import DEMO_USER, announce_demo_user
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
