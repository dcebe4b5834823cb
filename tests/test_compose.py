"""compose.yaml against the compose specification's JSON schema (vendored in the
check-jsonschema package; nothing is downloaded), and the references schemas cannot check:
every service, volume and secret named is defined, every command is a branchguard command."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from appliance import cli

from .tools import tool

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, check=False)


def test_compose_file_matches_the_compose_specification() -> None:
    result = _validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period: 60s",
                                                  "stop_grace_period: [60]"))
    result = _validate(broken)
    assert result.returncode != 0 and "stop_grace_period" in result.stdout + result.stderr


def test_every_reference_resolves_and_every_command_exists() -> None:
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert set(services) == {"nats", "node", "litestream"}
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in spec["volumes"], f"{name}: {volume}"
        for secret in service.get("secrets", []):
            assert secret in spec["secrets"], f"{name}: {secret}"
        assert service["command"][0] in cli.cli.commands, f"{name}: {service['command']}"
        assert service["restart"] == "unless-stopped", name  # a dead service comes back
    assert services["node"]["environment"]["BRANCHGUARD_REPLICATE"] == "false"
    assert services["node"]["volumes"] == services["litestream"]["volumes"][:1]
    assert "BRANCHGUARD_NATS_URL" in services["node"]["environment"]
    assert services["nats"]["volumes"] != services["node"]["volumes"]  # a lost node keeps the stream
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in ("appliance", "models"):
        assert f"COPY {folder} ./{folder}" in dockerfile  # the image has every module
