"""Monitoring: promtool accepts the alert rules and proves each one fires on synthetic
series; the rules and the Grafana dashboard use only metrics the operations doc defines."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from .tools import tool

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "branchguard.rules.yml"
TESTS = sorted(MONITORING.glob("branchguard.rules*.test.yml"))
METRIC = re.compile(r"\b(branchguard_[a-z0-9_]+?)(?:_bucket|_count|_sum)?\b")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=MONITORING, capture_output=True,
                          text=True, check=False)


def test_promtool_accepts_the_rules() -> None:
    result = _promtool("check", "rules", RULES.name)
    assert result.returncode == 0 and "SUCCESS: 9 rules found" in result.stdout, \
        result.stdout + result.stderr


def test_promtool_proves_every_alert_fires() -> None:
    assert len(TESTS) == 2
    result = _promtool("test", "rules", *(t.name for t in TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    fired = {case["alertname"] for path in TESTS for t in yaml.safe_load(path.read_text())["tests"]
             for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert alerts == fired, f"never shown to fire: {alerts - fired}"
    assert len(alerts) == 9


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    """The rule tests can fail: the same file expecting the replica alert a minute early."""
    text = (MONITORING / "branchguard.rules.test.yml").read_text().replace("rule_files:\n  - branchguard.rules.yml",
                                     f"rule_files:\n  - {RULES}")
    broken = tmp_path / "broken.test.yml"
    broken.write_text(text.replace("      - eval_time: 3m\n        alertname: "
                                   "BranchguardReplicationLag\n        exp_alerts: []",
                                   "      - eval_time: 3m\n        alertname: "
                                   "BranchguardReplicationLag\n        exp_alerts:\n"
                                   "          - exp_labels: {instance: \"br001:8080\"}"))
    assert broken.read_text() != text
    result = _promtool("test", "rules", str(broken))
    assert result.returncode != 0
    assert "BranchguardReplicationLag" in result.stdout + result.stderr


def used_metrics() -> set[str]:
    """Every ``branchguard_*`` metric the alert rules and the dashboard read."""
    used = set(METRIC.findall(RULES.read_text()))
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return used | {m for e in exprs for m in METRIC.findall(e)}


def test_rules_and_dashboard_use_only_documented_metrics() -> None:
    documented = set(re.findall(r"`(branchguard_[a-z0-9_]+)`",
                                (ROOT / "docs" / "operations.md").read_text()))
    used = used_metrics()
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert used and used <= documented, f"undocumented metrics: {used - documented}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
