"""``branchguard bench features``: observe's CPU per transaction, compiled against pure Python
(a smoke run: numbers are reported, not judged)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from appliance import cli, compiled
from appliance.bench.features import MODULE, measure_features
from appliance.errors import SettingsError


def test_bench_features_times_both_and_checks_they_agree() -> None:
    result = CliRunner().invoke(cli.cli, ["bench", "features", "--count", "1500", "--warm",
                                          "1500", "--rounds", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["count"] == 1500 and report["warm"] == 1500
    assert len(report["pure_us"]) == 2 and all(us > 0 for us in report["pure_us"])
    assert report["status"] == compiled.status[MODULE]
    if report["status"] == compiled.COMPILED:
        assert len(report["compiled_us"]) == 2 and all(us > 0 for us in report["compiled_us"])
        assert report["identical"] is True
    else:  # nothing to compare with: said so, not made up
        assert report["compiled_us"] == []


def test_bench_features_says_which_ran() -> None:
    text = CliRunner().invoke(cli.cli, ["bench", "features", "--count", "500", "--warm", "0",
                                        "--rounds", "1"]).output
    assert "pure" in text and "µs/tx" in text
    if compiled.status[MODULE] == compiled.COMPILED:
        assert "compiled" in text and "bit-identical: yes" in text
    else:
        assert compiled.status[MODULE] in text


def test_bench_features_refuses_an_empty_run() -> None:
    with pytest.raises(SettingsError):
        measure_features(count=0)
