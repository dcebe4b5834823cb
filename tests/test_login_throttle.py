"""The sign-in throttle on its own: counts per username and per address, the lockout and its
expiry, what a success clears, and that a second process (or a restart) sees the same counts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.casework.login_throttle import LoginThrottle
from appliance.errors import SettingsError
from appliance.settings import load

T0 = 1_800_000_000.0


def throttle(tmp_path: Path) -> LoginThrottle:
    return LoginThrottle(tmp_path / "throttle", max_failures=5, window_seconds=900,
                         lockout_seconds=600)


def test_failures_are_counted_per_user_and_address(tmp_path: Path) -> None:
    t = throttle(tmp_path)
    for i in range(3):
        assert t.failed("alice", "10.0.0.1", T0 + i) is None
    t.failed("bob", "10.0.0.1", T0 + 3)
    assert t.failures("alice", "10.0.0.1", T0 + 4) == (3, 4)
    assert t.failures("bob", "10.0.0.2", T0 + 4) == (1, 0)
    assert t.locked("alice", "10.0.0.1", T0 + 4) is None


def test_failures_outside_the_window_do_not_count(tmp_path: Path) -> None:
    t = throttle(tmp_path)
    for i in range(4):
        t.failed("alice", "10.0.0.1", T0 + i)
    assert t.failed("alice", "10.0.0.1", T0 + 901) is None  # the first two have aged out
    assert t.failures("alice", "10.0.0.1", T0 + 901) == (3, 3)  # T0 + 2, T0 + 3, T0 + 901


def test_the_fifth_failure_locks_until_the_lockout_ends(tmp_path: Path) -> None:
    t = throttle(tmp_path)
    for i in range(4):
        t.failed("alice", "10.0.0.1", T0 + i)
    lock = t.failed("alice", "10.0.0.1", T0 + 4)
    assert lock is not None and lock.until == T0 + 4 + 600
    assert "try again after" in lock.message(T0 + 4) and "10 minutes" in lock.message(T0 + 4)
    # the user is locked from any address, and the address for any user
    assert t.locked("alice", "10.9.9.9", T0 + 300) is not None
    assert t.locked("mallory", "10.0.0.1", T0 + 300) is not None
    assert t.locked("bob", "10.0.0.2", T0 + 300) is None
    assert t.locked("alice", "10.0.0.1", T0 + 604) is None  # expired: let in again
    assert t.failures("alice", "10.0.0.1", T0 + 604) == (0, 0)


def test_a_success_clears_only_its_own_username(tmp_path: Path) -> None:
    t = throttle(tmp_path)
    for i in range(4):
        t.failed("alice", "10.0.0.1", T0 + i)
    t.failed("bob", "10.0.0.2", T0 + 5)
    t.succeeded("bob")
    assert t.failures("alice", "10.0.0.1", T0 + 6) == (4, 4)
    assert t.failures("bob", "10.0.0.2", T0 + 6) == (0, 1)  # the address keeps its count
    assert t.failed("alice", "10.0.0.2", T0 + 7) is not None  # alice's fifth still locks


def test_usernames_are_counted_case_blind(tmp_path: Path) -> None:
    t = throttle(tmp_path)
    t.failed("Alice", "10.0.0.1", T0)
    assert t.failures("alice", "10.0.0.2", T0 + 1) == (1, 0)


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


@pytest.mark.parametrize("name, value", [("console_login_max_failures", 0),
                                         ("console_login_lockout_minutes", 0),
                                         ("console_login_window_minutes", -1)])
def test_limits_are_validated(tmp_path: Path, name: str, value: object) -> None:
    with pytest.raises(SettingsError) as err:
        load(None, env={}, data_dir=tmp_path, **{name: value})
    assert err.value.field == name
