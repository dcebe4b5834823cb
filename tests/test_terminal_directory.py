"""The terminal directory: a checked CSV import (bad rows named, nothing written), upserts,
the audit entry, the CLI, and the simulator's terminals placed where its transactions say."""

from __future__ import annotations

import itertools
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import cli
from appliance.casework.terminal_directory import (TOWN_CENTRES, import_terminals, read_sites,
                                                   simulated_sites)
from appliance.errors import BranchguardError
from appliance.feed.simulate import simulate
from appliance.feed.terminal import population
from appliance.settings import Settings, load
from appliance.store import open_db
from tests.support import query

HEADER = "terminal_id,name,branch,latitude,longitude\n"
GOOD = HEADER + ("T0001,Main street ATM,BR001,60.1699,24.9384\n"
                 "T0002,\"Kauppatori, kiosk <b>\",BR001,60.1675,24.9525\n"
                 "T0003,Web shop,BR001,,\n")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = load(None, env={}, data_dir=tmp_path / "node")
    open_db(s.db_path).close()
    return s


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "terminals.csv"
    path.write_text(text)
    return path


def directory(settings: Settings) -> list[tuple[object, ...]]:
    return query(settings.db_path, "SELECT terminal_id, name, branch, latitude, longitude "
                 "FROM terminals ORDER BY terminal_id")


def test_import_stores_rows_and_audits_once(settings: Settings, tmp_path: Path) -> None:
    result = import_terminals(settings.db_path, write(tmp_path, GOOD))
    assert (result.terminals, result.placed) == (3, 2)
    assert directory(settings) == [
        ("T0001", "Main street ATM", "BR001", 60.1699, 24.9384),
        ("T0002", "Kauppatori, kiosk <b>", "BR001", 60.1675, 24.9525),
        ("T0003", "Web shop", "BR001", None, None)]
    moved = HEADER + "T0001,Main street ATM (moved),BR002,60.2,24.9\n"
    import_terminals(settings.db_path, write(tmp_path, moved))
    assert directory(settings)[0] == ("T0001", "Main street ATM (moved)", "BR002", 60.2, 24.9)
    assert len(directory(settings)) == 3
    entries = query(settings.db_path, "SELECT actor, action, subject, after FROM audit_log "
                    "WHERE action = 'terminals.import' ORDER BY seq")
    assert [e[:3] for e in entries] == [("cli", "terminals.import", "terminals")] * 2
    assert json.loads(entries[0][3]) == {"source": "file:terminals.csv", "terminals": 3,
                                         "placed": 2}


@pytest.mark.parametrize("row, field, line_text", [
    ("T 1,ATM,BR001,60,24", "terminal_id", "line 3"),
    ("T0009,ATM,BR 1,60,24", "branch", "line 3"),
    ("T0009,,BR001,60,24", "name", "line 3"),
    ("T0009,ATM,BR001,91,24", "latitude", "line 3"),
    ("T0009,ATM,BR001,60,east", "longitude", "line 3"),
    ("T0009,ATM,BR001,nan,24", "latitude", "line 3"),
    ("T0009,ATM,BR001,60,", "longitude", "line 3"),
    ("T0009,ATM,BR001,,24", "latitude", "line 3"),
    ("T0001,ATM again,BR001,60,24", "terminal_id", "first on line 2"),
    ("T0009,ATM,BR001,60", "row", "line 3"),
])
def test_a_bad_row_is_named_and_nothing_is_written(settings: Settings, tmp_path: Path,
                                                   row: str, field: str,
                                                   line_text: str) -> None:
    text = HEADER + "T0001,Main street ATM,BR001,60.1699,24.9384\n" + row + "\n"
    with pytest.raises(BranchguardError) as err:
        import_terminals(settings.db_path, write(tmp_path, text))
    assert err.value.field == field and line_text in err.value.message
    assert directory(settings) == []


def test_a_file_without_the_columns_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BranchguardError) as err:
        read_sites(write(tmp_path, "terminal,lat,lon\nT1,60,24\n"))
    assert err.value.field == "header" and "terminal_id,name,branch" in str(err.value.hint)


def test_cli_imports_and_reports_errors(settings: Settings, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli.cli, ["terminals", "import", str(write(tmp_path, GOOD)),
                                 "--data-dir", str(settings.data_dir)])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout) == {"terminals": 3, "placed": 2}
    bad = runner.invoke(cli.cli, ["terminals", "import",
                                  str(write(tmp_path, HEADER + "T1,x,BR001,100,0\n")),
                                  "--data-dir", str(settings.data_dir)])
    assert bad.exit_code != 0 and "latitude" in bad.output and "line 2" in bad.output
    missing = runner.invoke(cli.cli, ["terminals", "import", str(write(tmp_path, GOOD)),
                                      "--data-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "no node database here" in missing.output


def test_simulated_terminals_stand_in_the_town_their_transactions_name() -> None:
    accounts, terminals = population(5.0)
    sites = {s.terminal_id: s for s in simulated_sites(42, accounts=accounts,
                                                       terminals=terminals, branch="BR001")}
    assert len(sites) == terminals
    assert sites == {s.terminal_id: s for s in simulated_sites(
        42, accounts=accounts, terminals=terminals, branch="BR001")}  # seeded
    start = datetime(2026, 12, 1, tzinfo=timezone.utc)
    seen = 0
    for item in itertools.islice(simulate(42, start=start, rate=5.0, accounts=accounts,
                                          terminals=terminals, diurnal=False), 2000):
        site = sites[item.tx.terminal_id]
        if item.tx.channel == "ONLINE":
            assert site.latitude is None and site.longitude is None
            continue
        lat, lon = TOWN_CENTRES[str(item.tx.location)]
        assert site.latitude is not None and site.longitude is not None
        km = math.hypot((site.latitude - lat) * 111,
                        (site.longitude - lon) * 111 * math.cos(math.radians(lat)))
        assert km < 20, (item.tx.terminal_id, item.tx.location, km)
        seen += 1
    assert seen > 1000
