"""The systemd units: `systemd-analyze verify` with no warnings, every service's offline
security exposure OK or better, one hardening block, only the data directory writable."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import cli

from .tools import tool

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
INSTALLED_BIN = "/opt/branchguard/venv/bin/branchguard"
GOOD_RATINGS = ("PERFECT", "SAFE", "OK")
PENDING: set[tuple[str, ...]] = set()
"""Sub-commands the units may run before the CLI has them (none now): every ExecStart must
name a command the CLI has."""


def _services() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units as installed for this virtualenv: ExecStart points at its branchguard
    (verify checks that the command exists), everything else byte-for-byte."""
    out = tmp_path_factory.mktemp("units")
    here = str(Path(sys.executable).parent / "branchguard")
    for unit in UNITS.iterdir():
        (out / unit.name).write_text(unit.read_text().replace(INSTALLED_BIN, here))
    return out


def test_every_unit_verifies_without_a_warning(staged: Path) -> None:
    units = sorted(p.name for p in staged.iterdir())
    assert len([u for u in units if u.endswith(".service")]) == 13
    result = subprocess.run([tool("systemd-analyze"), "verify", "--man=no", *units],
                            cwd=staged, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


@pytest.mark.parametrize("unit", [p.name for p in _services()])
def test_each_service_is_rated_ok_or_better(staged: Path, unit: str) -> None:
    result = subprocess.run([tool("systemd-analyze"), "security", "--offline=yes",
                             "--no-pager", unit], cwd=staged, capture_output=True, text=True,
                            check=False)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert match.group(2) in GOOD_RATINGS, f"{unit}: {match.group(0)}"


def _settings_of(unit: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            pairs.append((key, value))
    return pairs


def test_one_hardening_block_and_only_the_data_dir_writable() -> None:
    blocks = set()
    for unit in _services():
        text = unit.read_text()
        block = text[text.index("# --- hardening"):].split("\n\n")[0].strip()
        blocks.add(block)
        pairs = dict(_settings_of(unit))
        assert pairs["User"] == "branchguard" and pairs["ProtectSystem"] == "strict"
        assert pairs["NoNewPrivileges"] == "yes" and pairs["PrivateTmp"] == "yes"
        assert [v for k, v in _settings_of(unit) if k == "ReadWritePaths"] == \
            ["/var/lib/branchguard"]
    assert len(blocks) == 1, "the hardening blocks differ"


def test_every_exec_start_is_a_branchguard_command() -> None:
    for unit in _services():
        argv = shlex.split(dict(_settings_of(unit))["ExecStart"])
        assert argv[0] == INSTALLED_BIN, unit.name
        words = tuple(a for a in argv[1:] if not a.startswith("-"))
        command = cli.cli.commands.get(words[0])
        if command is None or (len(words) > 1 and words[1] not in
                               getattr(command, "commands", {words[1]: None})):
            assert words in PENDING, f"{unit.name}: branchguard {' '.join(words)} is unknown"


def test_each_oneshot_has_its_timer() -> None:
    for unit in _services():
        if dict(_settings_of(unit)).get("Type") == "oneshot":
            timer = UNITS / unit.name.replace(".service", ".timer")
            assert timer.exists() and f"Unit={unit.name}" in timer.read_text()


def test_every_long_running_service_is_restarted_whatever_ended_it_and_never_given_up() -> None:
    long_running = [u for u in _services() if dict(_settings_of(u)).get("Type") != "oneshot"]
    assert len(long_running) == 10
    for unit in long_running:
        pairs = dict(_settings_of(unit))
        assert pairs.get("Restart") == "always", unit.name  # a kill -9 or a clean exit alike
        assert pairs.get("StartLimitIntervalSec") == "0", unit.name  # no start limit


def test_the_scorer_leaves_the_api_to_the_web_unit() -> None:
    """Otherwise ``run`` starts an API child on the port branchguard-web serves."""
    scorer = [v for k, v in _settings_of(UNITS / "branchguard-scorer.service")
              if k == "Environment"]
    assert "BRANCHGUARD_RUN_API=false" in scorer and "BRANCHGUARD_REPLICATE=false" in scorer
