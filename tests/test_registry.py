"""The registry: the shipped model is production by default; promote, rollback and stages; the
production pointer stays valid under concurrent writers and when a writer is killed."""

from __future__ import annotations

import getpass
import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import cli
from appliance.errors import ModelError
from appliance.scoring.registry import STATE_FILE, Registry
from appliance.settings import SHIPPED_MODELS_DIR

VERSIONS = ("m-a", "m-b", "m-c")


def copy_shipped(root: Path, version: str) -> None:
    """A registered model that is the shipped forest under another version name."""
    root.mkdir(parents=True, exist_ok=True)
    card = json.loads((SHIPPED_MODELS_DIR / "if-v1.json").read_text())
    card.update(version=version, stage="candidate", parent_version="if-v1")
    shutil.copyfile(SHIPPED_MODELS_DIR / "if-v1.onnx", root / f"{version}.onnx")
    (root / f"{version}.json").write_text(json.dumps(card))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    root = tmp_path / "models"
    for version in VERSIONS:
        copy_shipped(root, version)
    return Registry(root, SHIPPED_MODELS_DIR, "if-v1")


def test_shipped_model_is_production_by_default(registry: Registry) -> None:
    assert registry.production() == "if-v1"
    assert registry.load("if-v1").version == "if-v1"
    assert set(VERSIONS) | {"if-v1"} == set(registry.versions())
    assert registry.card("if-v1")["stage"] == "production"
    assert registry.card("m-a")["stage"] == "candidate"


def test_promote_and_rollback_move_the_pointer_and_stages(registry: Registry) -> None:
    registry.promote("m-a", reason="test")
    assert registry.production() == "m-a"
    assert registry.card("if-v1")["stage"] == "retired"
    registry.promote("m-b")
    assert registry.state().history == ("if-v1", "m-a")
    registry.rollback()
    assert registry.production() == "m-a"
    assert registry.card("m-b")["stage"] == "retired"
    registry.rollback()
    assert registry.production() == "if-v1"
    with pytest.raises(ModelError) as info:
        registry.rollback()
    assert info.value.field == "history"


def test_a_model_that_does_not_match_its_card_is_never_promoted(registry: Registry) -> None:
    onnx = registry.root / "m-c.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    with pytest.raises(ModelError) as info:
        registry.promote("m-c")
    assert info.value.field == "sha256"
    assert registry.production() == "if-v1"
    with pytest.raises(ModelError):
        registry.promote("no-such-model")


def test_one_shadow_at_a_time(registry: Registry) -> None:
    registry.set_stage("m-a", "shadow")
    registry.set_stage("m-b", "shadow")
    assert registry.shadow() == "m-b"
    assert registry.card("m-a")["stage"] == "candidate"
    with pytest.raises(ModelError):
        registry.set_stage("if-v1", "retired")  # production: promote another first


def _flip(root: str, rounds: int, seed: int, out: "multiprocessing.Queue[list[int]]") -> None:
    """Promote (and, for odd seeds, roll back) in a loop; report the history length each
    effective promotion produced."""
    reg = Registry(Path(root), SHIPPED_MODELS_DIR, "if-v1")
    lengths = []
    for i in range(rounds):
        if seed % 2 and i % 3 == 2:
            try:
                reg.rollback()
            except ModelError:
                pass
            continue
        mark = f"w{seed}-{i}"
        state = reg.promote(VERSIONS[(i + seed) % len(VERSIONS)], reason=mark)
        if state.reason == mark:
            lengths.append(len(state.history))
    out.put(lengths)


@pytest.mark.parametrize("with_rollbacks", [False, True])
def test_concurrent_promote_and_rollback_keep_a_consistent_pointer(
        registry: Registry, with_rollbacks: bool) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    seeds = [1, 3, 5, 7] if with_rollbacks else [0, 2, 4, 6]
    workers = [ctx.Process(target=_flip, args=(str(registry.root), 12, s, out)) for s in seeds]
    for w in workers:
        w.start()
    lengths = [n for _ in workers for n in out.get(timeout=120)]
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    state = registry.state()
    assert state.production in set(VERSIONS) | {"if-v1"}
    assert state.production not in state.stages
    registry.load(state.production)
    if not with_rollbacks:
        # every promotion saw the one before it: no lost update, so the history lengths the
        # effective promotions produced are exactly 1, 2, ..., n
        assert sorted(lengths) == list(range(1, len(lengths) + 1))
        assert len(state.history) == len(lengths)


CRASHER = """
import os, sys
from pathlib import Path
from appliance.scoring.registry import Registry
from appliance.settings import SHIPPED_MODELS_DIR
reg = Registry(Path(sys.argv[1]), SHIPPED_MODELS_DIR, "if-v1")
versions = ["m-a", "m-b", "m-c"]
if sys.argv[2] == "die-before-rename":
    os.replace = lambda *a: os._exit(9)   # the process dies with the new state only in a temp file
    reg.promote("m-b")
i = 0
while True:
    reg.promote(versions[i % 3]); i += 1
"""


def test_a_writer_killed_at_any_point_leaves_a_valid_pointer(registry: Registry) -> None:
    registry.promote("m-a")
    died = subprocess.run([sys.executable, "-c", CRASHER, str(registry.root),
                           "die-before-rename"], timeout=60)
    assert died.returncode == 9
    assert registry.production() == "m-a"  # the interrupted promotion never happened

    for delay in (0.3, 0.45, 0.6, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(registry.root), "loop"])
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        text = (registry.root / STATE_FILE).read_text()
        state = json.loads(text)  # never torn
        assert state["production"] in VERSIONS
        registry.load(registry.production())
    registry.promote("m-c")  # the lock a killed writer held is released with its process
    assert registry.production() == "m-c"


def test_models_cli_list_show_promote_rollback(tmp_path: Path) -> None:
    copy_shipped(tmp_path / "node" / "models", "m-a")
    env = {"BRANCHGUARD_DATA_DIR": str(tmp_path / "node")}
    runner = CliRunner(env=env)
    listed = runner.invoke(cli.cli, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    assert "if-v1" in listed.output and "production" in listed.output and "m-a" in listed.output
    shown = runner.invoke(cli.cli, ["models", "show", "m-a"])
    assert json.loads(shown.stdout)["parent_version"] == "if-v1"
    assert runner.invoke(cli.cli, ["models", "promote", "m-a"]).exit_code == 0
    assert Registry(tmp_path / "node" / "models", SHIPPED_MODELS_DIR, "if-v1").production() == "m-a"
    assert runner.invoke(cli.cli, ["models", "rollback"]).exit_code == 0
    bad = runner.invoke(cli.cli, ["models", "promote", "nope"])
    assert bad.exit_code == 2 and "version" in bad.output
    staged = runner.invoke(cli.cli, ["models", "stage", "m-a", "shadow"])
    assert staged.exit_code == 0, staged.output
    assert Registry(tmp_path / "node" / "models", SHIPPED_MODELS_DIR, "if-v1").shadow() == "m-a"
    refused = runner.invoke(cli.cli, ["models", "stage", "if-v1", "retired"])
    assert refused.exit_code == 2 and "production" in refused.output
    # the changes are in the node's audit trail, by the OS user, and the refused ones are not
    conn = sqlite3.connect(tmp_path / "node" / "branchguard.db")
    entries = conn.execute("SELECT actor, action, subject FROM audit_log ORDER BY seq").fetchall()
    actor = f"cli:{getpass.getuser()}"
    assert entries == [(actor, "model.promote", "model:m-a"),
                       (actor, "model.rollback", "model:if-v1"),
                       (actor, "model.stage", "model:m-a")]
