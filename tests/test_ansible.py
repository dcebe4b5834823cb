"""The Ansible role: ansible-lint clean, and converging a throwaway root twice, the second
run changing nothing (idempotent). Paths all point into the temp root; the user, Debian
packages and services are left alone (not under systemd here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from appliance.nats_auth import load_auth
from appliance.settings import load

from .tools import tool

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "ansible"


def _env(tmp: Path) -> dict[str, str]:
    # without PYTHONPATH: the throwaway virtualenv must see only what the role installed
    inherited = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**inherited, "ANSIBLE_HOME": str(tmp / "ansible-home"), "ANSIBLE_NOCOLOR": "1",
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


def _throwaway(root: Path, wheel_dir: Path) -> dict[str, object]:
    """The role's variables for a throwaway root: no become, user, packages or services, and
    the package from the wheel built from this tree."""
    return {
        "branchguard_root": str(root), "branchguard_become": False,
        "branchguard_manage_user": False, "branchguard_manage_packages": False,
        "branchguard_manage_services": False, "branchguard_python": sys.executable,
        "branchguard_pip_extra_args": f"--no-index --find-links {wheel_dir} --no-deps",
    }


def _recap(output: str) -> dict[str, int]:
    match = re.search(r"localhost\s+:\s+(.*)", output)
    assert match, output
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def test_the_role_converges_a_throwaway_root_and_is_idempotent(tmp_path: Path,
                                                                 wheel_dir: Path) -> None:
    root = tmp_path / "root"
    extra = {
        **_throwaway(root, wheel_dir),
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


def test_the_role_deploys_one_server_of_a_jetstream_cluster(tmp_path: Path,
                                                             wheel_dir: Path) -> None:
    root = tmp_path / "root"
    hosts = ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
    command = tmp_path / "branchguard"  # this tree's command: the role's venv has no deps here
    command.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m appliance \"$@\"\n")
    command.chmod(0o755)
    extra = {
        **_throwaway(root, wheel_dir),
        "branchguard_nats_host": "0.0.0.0", "branchguard_nats_node_password": "vault-node",
        "branchguard_terminal_groups": [{"name": "atm", "password": "vault-atm",
                                         "terminals": ["ATM01"]}],
        "branchguard_nats_cluster_hosts": hosts, "branchguard_nats_cluster_self": hosts[1],
        "branchguard_command": str(command), "branchguard_partitions": 6,
        "branchguard_partition_replica_url": "s3://replicas/site-1/p{partition}",
    }
    first = _recap(_converge(tmp_path, root, extra))
    assert first["failed"] == 0 and first["changed"] > 0, first
    second = _recap(_converge(tmp_path, root, extra))
    assert second["changed"] == 0 and second["failed"] == 0, second

    etc = root / "etc" / "branchguard"
    settings = load(etc / "branchguard.toml", env={})  # what the scorer on this host reads
    assert settings.stream_replicas == 3 and settings.partitions == 6
    assert settings.replicate  # each partition's litestream runs in the cluster scorer
    assert settings.partition_replica_url == "s3://replicas/site-1/p{partition}"
    assert settings.nats_url == ",".join(f"nats://{h}:4222" for h in hosts)
    cluster = etc / "nats-cluster"
    assert sorted(p.name for p in cluster.iterdir()) == [
        "branchguard-cluster.toml", "nats-1.conf", "nats-2.conf", "nats-3.conf"]
    own = (cluster / "nats-2.conf").read_text()  # this host's server: the second in the list
    assert 'server_name: "nats-2"' in own and '"listen": "10.0.0.12:6222"' in own
    assert "nats-route://node:vault-node@10.0.0.11:6222" in own
    assert "nats-route://node:vault-node@10.0.0.13:6222" in own and "10.0.0.12:6222\"\n" not in own
    assert '"store_dir"' not in own and 'store_dir: "/var/lib/branchguard/nats-cluster/nats-2"' in own
    assert '"user": "atm"' in own  # the terminals' users, as on a single server
    for conf in cluster.iterdir():
        assert conf.stat().st_mode & 0o077 == 0o040, conf.name  # 0640: it holds passwords
    units = {p.name for p in (root / "etc" / "systemd" / "system").iterdir()}
    assert "branchguard-nats-cluster@.service" in units
    assert "branchguard-cluster-scorer.service" in units  # what a partitioned host runs


def test_the_role_deploys_a_regional_hub_and_a_branch_of_it(tmp_path: Path,
                                                             wheel_dir: Path) -> None:
    command = tmp_path / "branchguard"  # this tree's command: the role's venv has no deps here
    command.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m appliance \"$@\"\n")
    command.chmod(0o755)
    hub_root = tmp_path / "hub-root"
    hub = {**_throwaway(hub_root, wheel_dir), "branchguard_command": str(command),
           "branchguard_role": "hub", "branchguard_hub_branches": ["br1", "br2"],
           "branchguard_hub_public_host": "hub.region.example"}
    first = _recap(_converge(tmp_path, hub_root, hub))
    assert first["failed"] == 0 and first["changed"] > 0, first
    second = _recap(_converge(tmp_path, hub_root, hub))
    assert second["changed"] == 0 and second["failed"] == 0, second  # passwords kept
    etc = hub_root / "etc" / "branchguard"
    written = etc / "hub"
    assert {p.name for p in written.iterdir()} >= {"hub.conf", "hub.toml", "hub-secrets.toml",
                                                   "branches"}
    for name in ("hub.conf", "hub.toml"):
        assert (written / name).stat().st_mode & 0o077 == 0o040, name  # the group reads it
    assert 'store_dir: "/var/lib/branchguard/hub"' in (written / "hub.conf").read_text()
    env = dict(line.split("=", 1) for line in (etc / "branchguard.env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["BRANCHGUARD_CONFIG"] == "/etc/branchguard/hub/hub.toml"  # the hub's processes
    hub_settings = load(written / "hub.toml", env={})
    assert hub_settings.hub_branches == ("br1", "br2")
    assert hub_settings.hub_monitor_url == "http://127.0.0.1:8222"
    for unit in ("branchguard-hub.service", "branchguard-hub-nats.service"):
        assert (hub_root / "etc" / "systemd" / "system" / unit).exists()

    br1 = tomllib.loads((written / "branches" / "br1.toml").read_text())
    branch_root = tmp_path / "branch-root"
    branch = {**_throwaway(branch_root, wheel_dir), "branchguard_branch": "br1",
              "branchguard_hub_url": br1["hub_url"]}
    assert _recap(_converge(tmp_path, branch_root, branch))["failed"] == 0
    etc = branch_root / "etc" / "branchguard"
    env = dict(line.split("=", 1) for line in (etc / "branchguard.env").read_text().splitlines()
               if line and not line.startswith("#"))
    settings = load(etc / "branchguard.toml", env=env)
    assert (settings.branch, settings.jetstream_domain) == ("br1", "br1")
    assert settings.hub_url == br1["hub_url"] and "hub.region.example:7422" in br1["hub_url"]
    assert br1["hub_url"] not in (etc / "branchguard.toml").read_text()  # a secret: env only
