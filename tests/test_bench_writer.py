"""``branchguard bench writer``: the writer's CPU and WAL frames per row by rows per commit
(a smoke run: the CPU is reported, not judged; the frames are exact)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from appliance import cli
from appliance.bench.writer import measure_writer
from appliance.errors import SettingsError


def test_bench_writer_counts_fewer_wal_frames_a_row_in_larger_groups() -> None:
    result = CliRunner().invoke(cli.cli, ["bench", "writer", "--rows", "4000", "--groups",
                                          "100,2000", "--rounds", "2",
                                          "--checkpoint-every", "1000", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    small, large = report["groups"]
    assert (small["rows_per_group"], large["rows_per_group"]) == (100, 2000)
    assert all(len(g["us_per_row"]) == 2 and min(g["us_per_row"]) > 0 for g in (small, large))
    # each commit writes every page it dirtied: at least its share of the table's pages,
    # and far fewer a row when 2,000 rows share the index pages than when 100 do
    assert 0 < large["wal_frames_per_row"] < small["wal_frames_per_row"] / 2


def test_bench_writer_says_what_it_measured() -> None:
    text = CliRunner().invoke(cli.cli, ["bench", "writer", "--rows", "600", "--groups", "50",
                                        "--rounds", "1"]).output
    assert "600 rows" in text and "WAL frames/row" in text and "50" in text


def test_bench_writer_refuses_an_empty_run() -> None:
    with pytest.raises(SettingsError):
        measure_writer(rows=0)
