"""The Ansible role: ansible-lint clean, and converging a throwaway root twice, the second
run changing nothing (idempotent). Paths all point into the temp root; the user, Debian
packages and services are left alone (not under systemd here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.nats_auth import load_auth
from appliance.settings import load

from .tools import tool

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "ansible"


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "ANSIBLE_HOME": str(tmp / "ansible-home"), "ANSIBLE_NOCOLOR": "1",
            "NO_COLOR": "1", "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
            "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles")}


def test_ansible_lint_is_clean(tmp_path: Path) -> None:
    result = subprocess.run([tool("ansible-lint"), "--offline", "--nocolor", "--profile",
                             "production"], cwd=ANSIBLE, capture_output=True, text=True,
                            env=_env(tmp_path), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as Ansible installs it: a wheel built from this tree."""
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                    str(out), str(ROOT)], check=True, capture_output=True)
    assert list(out.glob("branchguard-*.whl"))
    return out


def _converge(tmp: Path, root: Path, extra: dict[str, object]) -> str:
    inventory = tmp / "inventory.ini"
    inventory.write_text(f"[branchguard]\nlocalhost ansible_connection=local "
                         f"ansible_python_interpreter={sys.executable}\n")
    variables = tmp / "vars.json"
    variables.write_text(json.dumps(extra))
    result = subprocess.run([tool("ansible-playbook"), "-i", str(inventory),
                             str(ANSIBLE / "playbook.yml"), "-e", f"@{variables}"],
                            cwd=ANSIBLE, capture_output=True, text=True, env=_env(tmp),
                            check=False)  # cwd: ansible/ansible.cfg applies
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result.stdout


def _recap(output: str) -> dict[str, int]:
    match = re.search(r"localhost\s+:\s+(.*)", output)
    assert match, output
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def test_the_role_converges_a_throwaway_root_and_is_idempotent(tmp_path: Path,
                                                                 wheel_dir: Path) -> None:
    root = tmp_path / "root"
    extra = {
        "branchguard_root": str(root), "branchguard_become": False,
        "branchguard_manage_user": False, "branchguard_manage_packages": False,
        "branchguard_manage_services": False, "branchguard_python": sys.executable,
        "branchguard_pip_extra_args": f"--no-index --find-links {wheel_dir} --no-deps",
        "branchguard_branch": "BR042", "branchguard_nats_host": "0.0.0.0",
        "branchguard_nats_node_password": "vault-node-secret",
        "branchguard_terminal_groups": [{"name": "atm-lobby", "password": "vault-atm",
                                         "terminals": ["ATM01", "ATM02"]}],
        "branchguard_alerts_critical": ["json://127.0.0.1:9/hook"],
        "branchguard_replica_url": "s3://replicas/br042",
    }
    first = _recap(_converge(tmp_path, root, extra))
    assert first["failed"] == 0 and first["changed"] > 0, first
    second = _recap(_converge(tmp_path, root, extra))
    assert second["changed"] == 0 and second["failed"] == 0, second

    etc = root / "etc" / "branchguard"
    settings = load(etc / "branchguard.toml", env={})  # the settings the node will read
    assert settings.branch == "BR042" and settings.replicate is False
    assert settings.replica == "s3://replicas/br042"
    assert settings.nats_auth_file == Path("/etc/branchguard/nats-auth.toml")
    auth = load_auth(etc / "nats-auth.toml")
    assert auth.node_password == "vault-node-secret"
    assert auth.groups[0].terminals == ("ATM01", "ATM02")
    for secret in ("nats-auth.toml", "branchguard.env"):
        assert (etc / secret).stat().st_mode & 0o077 == 0o040, secret  # 0640
    env = dict(line.split("=", 1) for line in (etc / "branchguard.env").read_text().splitlines()
               if line and not line.startswith("#"))
    with_env = load(etc / "branchguard.toml", env=env)  # what the units' EnvironmentFile adds
    assert with_env.alerts_critical == ("json://127.0.0.1:9/hook",)
    assert with_env.alerts_high == () and with_env.alerts_warning == ()
    units = sorted(p.name for p in (root / "etc" / "systemd" / "system").iterdir())
    assert units == sorted(p.name for p in (ROOT / "systemd").iterdir())
    assert (root / "opt" / "branchguard" / "venv" / "bin" / "branchguard").exists()
    assert (root / "var" / "lib" / "branchguard").is_dir()
