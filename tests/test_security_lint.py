"""The security scan: ruff's flake8-bandit rules (``S``) over the package and the console."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .tools import tool

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_security_rules_find_nothing() -> None:
    """pyproject.toml selects the S rules and names the two it ignores, and why (on the
    command line ``--select`` would override that list)."""
    result = subprocess.run([tool("ruff"), "check", "--output-format", "concise", "appliance",
                             "ui"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_secret_is_committed() -> None:
    """Key material and auth files live on the host (Ansible writes them), never here."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        assert not name.endswith((".key", ".pem", ".creds", ".nk", "nats-auth.toml")), name
        path = ROOT / name
        if path.is_file() and path.stat().st_size < 1_000_000:
            assert b"-----BEGIN" + b" PRIVATE KEY-----" not in path.read_bytes(), name
