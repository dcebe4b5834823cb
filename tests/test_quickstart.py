"""The README's two commands, from a fresh clone: each sets itself up and works."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .support import query, wait_until

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
            if scored and int(scored[-1].split("|")[1].split()[0]) > 5:  # 0.25 tx/s
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
    db = clone / "var" / "branchguard.db"
    assert query(db, "SELECT count(*) FROM transactions")[0][0] > 100
    _readme_commands_work_as_written(clone, db)
    newest = _newest(db)
    assert newest is not None
    covered = _count_up_to(db, newest)

    # A restart loads the history it missed since then, not the weeks again.
    again = clone / "again.out"
    with again.open("wb") as sink:
        node = subprocess.Popen([str(clone / ".venv" / "bin" / "branchguard"), "run", "--demo"],
                                cwd=clone, stdout=sink, stderr=subprocess.STDOUT,
                                env=_clean_env(), start_new_session=True)
    try:
        wait_until(lambda: _logged(again, '"demo.feed"', node), timeout=300,
                   message="the restarted demo's feed")
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
    # the seconds it was away, at 0.25 tx/s: a few rows, not the weeks of a new node
    assert 0 <= feed["history_rows"] <= (restarted - newest) + 50, feed
    # nothing was slipped in behind what the accounts already had
    assert _count_up_to(db, newest) == covered


def _readme_commands_work_as_written(clone: Path, db: Path) -> None:
    """The README's first block of ``branchguard`` commands after ``make run``, run as
    written in a new shell whose PATH has no virtualenv on it, as a user's would."""
    text = (clone / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", text, re.S)
                 if re.search(r"^branchguard ", b, re.M))
    env = _clean_env()
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if "venv" not in p)
    done = subprocess.run(["sh", "-e", "-c", block], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"{block}\n{done.stdout}\n{done.stderr}"
    counts = json.loads(done.stdout[done.stdout.index("{"):])
    assert counts["transactions"] == query(db, "SELECT count(*) FROM transactions")[0][0]


def _newest(db: Path) -> float | None:
    value = query(db, "SELECT max(ts) FROM transactions")[0][0]
    return None if value is None else float(value)


def _count_up_to(db: Path, ts: float) -> int:
    return int(query(db, "SELECT count(*) FROM transactions WHERE ts <= ?", [ts])[0][0])


def _logged(out: Path, marker: str, process: subprocess.Popen[bytes]) -> bool:
    """Whether ``marker`` is in the process's output yet; fails if it died without it."""
    text = out.read_text(errors="replace")
    assert marker in text or process.poll() is None, text[-3000:]
    return marker in text


def _wait_until_live(db: Path, make: subprocess.Popen[bytes]) -> None:
    """Until the demo has loaded its history and streams in real time."""
    def live() -> bool:
        assert make.poll() is None
        newest = _newest(db)
        return newest is not None and newest > time.time() - 30
    wait_until(live, timeout=300, message="the demo to catch up with the clock")


@pytest.mark.timeout(900)
def test_make_test_sets_itself_up_and_runs_tests(clone: Path) -> None:
    result = subprocess.run(["make", "test", "PYTEST_ARGS=-q -p no:cacheprovider "
                             "tests/test_transaction.py"], cwd=clone, env=_clean_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
    assert (clone / ".venv" / "bin" / "nats-server").exists()
