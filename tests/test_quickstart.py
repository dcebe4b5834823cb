"""The README's two commands, from a fresh clone: each sets itself up and works."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("fresh") / "branchguard"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True)
    return target


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BRANCHGUARD_", "VIRTUAL_ENV", "PYTEST"))}
    env["BRANCHGUARD_NATS_PORT"] = "0"  # a free port: never collide with a real node
    env["BRANCHGUARD_API_PORT"] = "0"   # the same for the analyst API it starts
    env["BRANCHGUARD_SUMMARY_INTERVAL_SECONDS"] = "1"
    return env


@pytest.mark.timeout(900)
def test_make_run_starts_the_demo_node_and_ctrl_c_stops_it(clone: Path) -> None:
    out = clone / "run.out"
    with out.open("wb") as sink:
        make = subprocess.Popen(["make", "run"], cwd=clone, stdout=sink,
                                stderr=subprocess.STDOUT, env=_clean_env(),
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            text = out.read_text(errors="replace")
            scored = [line for line in text.splitlines() if " scored | " in line]
            if scored and int(scored[-1].split("|")[1].split()[0]) > 100:
                break
            assert make.poll() is None, text[-3000:]
            time.sleep(1)
        else:
            raise AssertionError(out.read_text(errors="replace")[-3000:])
        deadline = time.monotonic() + 120  # the API and console child starts beside it
        while not (port := re.search(r'"api.listening".*?"port":(\d+)',
                                     out.read_text(errors="replace"))):
            assert time.monotonic() < deadline, "make run did not start the analyst API"
            assert make.poll() is None, out.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/healthz") as answer:
            assert json.loads(answer.read()) == {"status": "ok"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/console/login") as page:
            assert page.status == 200  # the console is served too, behind its login
        _wait_until_live(clone / "var" / "branchguard.db", make)
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        make.wait(60)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(60)
    text = out.read_text(errors="replace")
    assert '"node.stopped"' in text and '"nats.stopped"' in text, text[-3000:]
    survivors = subprocess.run(["pgrep", "-f", f"{clone}/var/nats"], capture_output=True)
    assert survivors.stdout == b"", "nats-server outlived make run"
    db = sqlite3.connect(clone / "var" / "branchguard.db")
    try:
        assert db.execute("SELECT count(*) FROM transactions").fetchone()[0] > 100
        newest = db.execute("SELECT max(ts) FROM transactions").fetchone()[0]
        covered = db.execute("SELECT count(*) FROM transactions WHERE ts <= ?",
                             [newest]).fetchone()[0]
    finally:
        db.close()

    # A restart publishes the history it missed since then, not the half hour again.
    again = clone / "again.out"
    with again.open("wb") as sink:
        node = subprocess.Popen([str(clone / ".venv" / "bin" / "branchguard"), "run", "--demo"],
                                cwd=clone, stdout=sink, stderr=subprocess.STDOUT,
                                env=_clean_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while '"demo.feed"' not in again.read_text(errors="replace"):
            assert time.monotonic() < deadline and node.poll() is None, \
                again.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        restarted = time.time()
        time.sleep(3)
        os.killpg(node.pid, signal.SIGINT)
        node.wait(60)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(60)
    feed = json.loads(next(line for line in again.read_text(errors="replace").splitlines()
                           if '"demo.feed"' in line))
    assert 0 <= feed["history_seconds"] <= restarted - newest + 1, feed
    assert feed["history_seconds"] < 600, feed  # not the 1,800 s of a new node
    db = sqlite3.connect(clone / "var" / "branchguard.db")
    try:  # nothing was slipped in behind what the accounts already had
        assert db.execute("SELECT count(*) FROM transactions WHERE ts <= ?",
                          [newest]).fetchone()[0] == covered
    finally:
        db.close()


def _wait_until_live(db_path: Path, make: subprocess.Popen[bytes]) -> None:
    """Until the demo has published its half hour of history and streams in real time."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert make.poll() is None
        db = sqlite3.connect(db_path)
        try:
            newest = db.execute("SELECT max(ts) FROM transactions").fetchone()[0]
        finally:
            db.close()
        if newest is not None and newest > time.time() - 30:
            return
        time.sleep(1)
    raise AssertionError("the demo never caught up with the clock")


@pytest.mark.timeout(900)
def test_make_test_sets_itself_up_and_runs_tests(clone: Path) -> None:
    result = subprocess.run(["make", "test", "PYTEST_ARGS=-q -p no:cacheprovider "
                             "tests/test_transaction.py"], cwd=clone, env=_clean_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
    assert (clone / ".venv" / "bin" / "nats-server").exists()
