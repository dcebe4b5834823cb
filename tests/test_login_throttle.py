"""The sign-in throttle on its own: counts per (username, address), the lockout and its
expiry, what a success clears, that a second process (or a restart) sees the same counts,
the unlock (library, command, audit) and the demo user's fresh password."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.audit import verify
from appliance.casework import users
from appliance.casework.login_throttle import LoginThrottle, unlock
from appliance.change import connect_writer
from appliance.cli import cli
from appliance.errors import SettingsError
from appliance.operations.runner import DEMO_USER, announce_demo_user
from appliance.settings import Settings, load
from appliance.store import open_db
from tests.support import query

T0 = 1_800_000_000.0


def throttle(tmp_path: Path) -> LoginThrottle:
    return LoginThrottle(tmp_path / "throttle", max_failures=5, window_seconds=900,
                         lockout_seconds=600)


def node(tmp_path: Path) -> Settings:
    settings = load(None, env={}, data_dir=tmp_path / "node", console_login_max_failures=3)
    open_db(settings.db_path).close()
    return settings


def lock(t: LoginThrottle, username: str, address: str, at: float = T0) -> None:
    for i in range(t.max_failures):
        t.failed(username, address, at + i)
    assert t.locked(username, address, at + t.max_failures) is not None


def test_failures_are_counted_per_user_and_address(tmp_path: Path) -> None:
    t = throttle(tmp_path)
    for i in range(3):
        assert t.failed("alice", "10.0.0.1", T0 + i) is None
    t.failed("bob", "10.0.0.1", T0 + 3)
    assert t.failures("alice", "10.0.0.1", T0 + 4) == 3
    assert t.failures("bob", "10.0.0.1", T0 + 4) == 1
    assert t.failures("alice", "10.0.0.2", T0 + 4) == 0
    assert t.locked("alice", "10.0.0.1", T0 + 4) is None


def test_failures_outside_the_window_do_not_count(tmp_path: Path) -> None:
    t = throttle(tmp_path)
    for i in range(4):
        t.failed("alice", "10.0.0.1", T0 + i)
    assert t.failed("alice", "10.0.0.1", T0 + 901) is None  # the first two have aged out
    assert t.failures("alice", "10.0.0.1", T0 + 901) == 3  # T0 + 2, T0 + 3, T0 + 901


def test_the_fifth_failure_locks_that_user_from_that_address_only(tmp_path: Path) -> None:
    t = throttle(tmp_path)
    for i in range(4):
        t.failed("alice", "10.0.0.1", T0 + i)
    lockout = t.failed("alice", "10.0.0.1", T0 + 4)
    assert lockout is not None and lockout.until == T0 + 4 + 600
    assert (lockout.username, lockout.address) == ("alice", "10.0.0.1")
    assert "try again after" in lockout.message(T0 + 4)
    assert "10 minutes" in lockout.message(T0 + 4)
    assert t.locked("alice", "10.0.0.1", T0 + 300) is not None
    # neither the user from elsewhere, nor the others at that address (one office, one NAT)
    assert t.locked("alice", "10.9.9.9", T0 + 300) is None
    assert t.locked("bob", "10.0.0.1", T0 + 300) is None
    assert t.locked("alice", "10.0.0.1", T0 + 604) is None  # expired: let in again
    assert t.failures("alice", "10.0.0.1", T0 + 604) == 0


def test_a_success_clears_only_its_own_user_and_address(tmp_path: Path) -> None:
    t = throttle(tmp_path)
    for i in range(4):
        t.failed("alice", "10.0.0.1", T0 + i)
    t.failed("bob", "10.0.0.2", T0 + 5)
    t.succeeded("alice", "10.0.0.3")  # alice signs in from another desk
    t.succeeded("bob", "10.0.0.2")
    assert t.failures("alice", "10.0.0.1", T0 + 6) == 4  # the guesses at 10.0.0.1 still count
    assert t.failures("bob", "10.0.0.2", T0 + 6) == 0
    assert t.failed("alice", "10.0.0.1", T0 + 7) is not None
    t.succeeded("alice", "10.0.0.1")  # (the page refuses a locked pair before it gets here)
    assert t.failures("alice", "10.0.0.1", T0 + 8) == 0


def test_usernames_are_counted_case_blind(tmp_path: Path) -> None:
    t = throttle(tmp_path)
    t.failed("Alice", "10.0.0.1", T0)
    assert t.failures("alice", "10.0.0.1", T0 + 1) == 1


def test_the_lock_is_logged_with_username_and_address(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    t = throttle(tmp_path)
    with caplog.at_level(logging.WARNING, logger="appliance.login_throttle"):
        lock(t, "alice", "10.0.0.1")
    [record] = [r for r in caplog.records if r.getMessage() == "console.login_locked"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["user"] == "alice" and fields["address"] == "10.0.0.1"
    assert fields["until"] == T0 + 4 + 600


def test_counts_are_shared_with_another_process_and_survive_a_restart(tmp_path: Path
                                                                      ) -> None:
    t = throttle(tmp_path)
    for i in range(2):
        t.failed("alice", "10.0.0.1", T0 + i)
    code = ("import sys; from pathlib import Path; from appliance.casework.login_throttle import "
            "LoginThrottle as L; t = L(Path(sys.argv[1]), 5, 900, 600); "
            "[t.failed('alice', '10.0.0.1', 1_800_000_002.0 + i) for i in range(3)]")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "throttle")], check=True,
                   timeout=60)
    assert t.locked("alice", "10.0.0.1", T0 + 10) is not None
    t.close()
    again = throttle(tmp_path)
    assert again.locked("alice", "10.0.0.1", T0 + 10) is not None


def test_clear_one_address_or_all_of_a_users(tmp_path: Path) -> None:
    t = throttle(tmp_path)
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        lock(t, "alice", address)
    lock(t, "bob", "10.0.0.1")
    assert t.clear("alice", "10.0.0.2") == ["10.0.0.2"]
    assert t.locked("alice", "10.0.0.2", T0 + 10) is None
    assert t.locked("alice", "10.0.0.1", T0 + 10) is not None
    assert sorted(t.clear("Alice")) == ["10.0.0.1", "10.0.0.3"]
    assert t.locked("alice", "10.0.0.1", T0 + 10) is None
    assert t.locked("alice", "10.0.0.3", T0 + 10) is None
    assert t.locked("bob", "10.0.0.1", T0 + 10) is not None  # someone else's: untouched
    assert t.clear("alice") == []


def test_unlock_is_audited_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                      ) -> None:
    settings = node(tmp_path)
    t = LoginThrottle.of(settings)
    lock(t, "alice", "10.0.0.1", T0)
    db = connect_writer(settings.db_path)
    with caplog.at_level(logging.INFO, logger="appliance.login_throttle"):
        assert unlock(settings, db, "alice", None, "cli:root") == ["10.0.0.1"]
    assert t.locked("alice", "10.0.0.1", T0 + 10) is None
    [(actor, action, subject, after)] = query(
        settings.db_path, "SELECT actor, action, subject, after FROM audit_log")
    assert (actor, action, subject) == ("cli:root", "user.unlock", "user:alice")
    assert json.loads(after) == {"username": "alice", "addresses": ["10.0.0.1"]}
    assert verify(db.conn).broken_seq is None
    [record] = [r for r in caplog.records if r.getMessage() == "console.login_unlocked"]
    assert record.fields["user"] == "alice"  # type: ignore[attr-defined]
    assert record.fields["addresses"] == ["10.0.0.1"]  # type: ignore[attr-defined]
    # nothing locked: nothing changes, nothing is written to the trail
    assert unlock(settings, db, "alice", "10.0.0.1", "cli:root") == []
    assert query(settings.db_path, "SELECT count(*) FROM audit_log") == [(1,)]


def test_users_unlock_command(tmp_path: Path) -> None:
    settings = node(tmp_path)
    t = LoginThrottle.of(settings)
    lock(t, "alice", "10.0.0.1")
    lock(t, "alice", "10.0.0.2")
    data = ["--data-dir", str(settings.data_dir)]
    result = CliRunner().invoke(cli, ["users", "unlock", "alice", "--address", "10.0.0.1",
                                      *data])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"username": "alice", "unlocked": ["10.0.0.1"]}
    assert t.locked("alice", "10.0.0.1", T0 + 10) is None
    assert t.locked("alice", "10.0.0.2", T0 + 10) is not None
    result = CliRunner().invoke(cli, ["users", "unlock", "alice", *data])
    assert json.loads(result.stdout) == {"username": "alice", "unlocked": ["10.0.0.2"]}
    assert query(settings.db_path, "SELECT count(*) FROM audit_log WHERE action = "
                                   "'user.unlock'") == [(2,)]
    bad = CliRunner().invoke(cli, ["users", "unlock", "Not A Name!", *data])
    assert bad.exit_code != 0 and "username" in bad.output


def test_the_demo_users_fresh_password_is_not_locked_out(tmp_path: Path) -> None:
    """An operator who restarts the demo to get a new password expects it to work at once,
    even after someone locked ``demo`` out with wrong guesses."""
    settings = node(tmp_path)
    announce_demo_user(settings, out=io.StringIO())
    t = LoginThrottle.of(settings)
    lock(t, DEMO_USER, "127.0.0.1", T0)
    lock(t, "alice", "127.0.0.1", T0)
    password = announce_demo_user(settings, out=io.StringIO())
    assert password is not None
    assert t.locked(DEMO_USER, "127.0.0.1", T0 + 10) is None
    assert t.locked("alice", "127.0.0.1", T0 + 10) is not None
    assert users.authenticate(connect_writer(settings.db_path).conn, DEMO_USER, password)


@pytest.mark.parametrize("name, value", [("console_login_max_failures", 0),
                                         ("console_login_lockout_minutes", 0),
                                         ("console_login_window_minutes", -1)])
def test_limits_are_validated(tmp_path: Path, name: str, value: object) -> None:
    with pytest.raises(SettingsError) as err:
        load(None, env={}, data_dir=tmp_path, **{name: value})
    assert err.value.field == name
