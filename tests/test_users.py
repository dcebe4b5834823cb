"""Console users: hashed passwords, roles, disable, password change, CLI, audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.audit import verify
from appliance.casework import users
from appliance.casework.users import UsersError
from appliance.change import connect_writer
from appliance.cli import cli
from appliance.store import open_db


@pytest.fixture
def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "node" / "branchguard.db"
    open_db(path).close()
    writer = connect_writer(path)
    yield writer
    writer.close()


def test_password_is_hashed_and_checked(db) -> None:  # type: ignore[no-untyped-def]
    password = users.create(db, "alice", "analyst", "test")
    assert len(password) >= users.MIN_PASSWORD
    stored = db.conn.execute("SELECT hash FROM console_users").fetchone()[0]
    assert stored.startswith("$argon2") and password not in stored
    user = users.authenticate(db.conn, "alice", password)
    assert user is not None and user.role == "analyst" and user.actor == "user:alice"
    assert users.authenticate(db.conn, "alice", password + "x") is None
    assert users.authenticate(db.conn, "nobody", password) is None


def test_bad_input_names_the_field(db) -> None:  # type: ignore[no-untyped-def]
    for kwargs, field in (({"username": "Bad Name", "role": "analyst"}, "username"),
                          ({"username": "bob", "role": "root"}, "role"),
                          ({"username": "bob", "role": "viewer", "password": "short"},
                           "password")):
        with pytest.raises(UsersError) as err:
            users.create(db, created_by="test", **kwargs)
        assert err.value.field == field
    users.create(db, "bob", "viewer", "test")
    with pytest.raises(UsersError, match="exists"):
        users.create(db, "bob", "viewer", "test")


def test_disable_and_new_password_end_access(db) -> None:  # type: ignore[no-untyped-def]
    old = users.create(db, "carol", "supervisor", "test")
    first = users.active(db.conn, "carol")
    new = users.set_password(db, "carol", "test")
    assert users.authenticate(db.conn, "carol", old) is None
    second = users.authenticate(db.conn, "carol", new)
    assert first is not None and second is not None
    assert second.password_changed_at > first.password_changed_at
    users.disable(db, "carol", "test")
    assert users.active(db.conn, "carol") is None
    assert users.authenticate(db.conn, "carol", new) is None


def test_changes_are_audited_without_secrets(db) -> None:  # type: ignore[no-untyped-def]
    password = users.create(db, "dave", "admin", "test")
    users.set_password(db, "dave", "test", "another-long-password")
    users.disable(db, "dave", "test")
    rows = db.conn.execute("SELECT action, before, after FROM audit_log ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ["user.create", "user.password", "user.disable"]
    text = json.dumps(rows)
    assert password not in text and "another-long-password" not in text and "argon2" not in text
    assert verify(db.conn).broken_seq is None


def test_cli_create_list_disable(tmp_path: Path) -> None:
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "var")]
    made = runner.invoke(cli, ["users", "create", "--username", "erin", "--role", "viewer",
                               *data])
    assert made.exit_code == 0, made.output
    password = json.loads(made.stdout.splitlines()[0])["password"]
    given = runner.invoke(cli, ["users", "create", "--username", "frank", "--role", "analyst",
                                "--password-stdin", *data], input="frank-password-123\n")
    assert given.exit_code == 0 and "password" not in json.loads(given.stdout.splitlines()[0])
    listed = json.loads(runner.invoke(cli, ["users", "list", *data]).stdout)
    assert [u["username"] for u in listed] == ["erin", "frank"]
    assert "hash" not in listed[0]
    assert runner.invoke(cli, ["users", "disable", "erin", *data]).exit_code == 0
    bad = runner.invoke(cli, ["users", "disable", "nobody", *data])
    assert bad.exit_code == 2 and "username" in bad.output
    conn = connect_writer(tmp_path / "var" / "branchguard.db").conn
    assert users.authenticate(conn, "erin", password) is None
    assert users.authenticate(conn, "frank", "frank-password-123") is not None
