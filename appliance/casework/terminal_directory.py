"""The terminal directory: each terminal's name, branch and place (WGS 84 latitude and
longitude), so the case page can show an account's terminals on a map.

Terminals do not send their place with a transaction; the bank knows where its ATMs and POS
terminals stand and loads that as a CSV (``branchguard terminals import FILE.csv``) with the
columns ``terminal_id,name,branch,latitude,longitude``. Latitude and longitude are both given
or both empty (an online merchant has no place). The file is read whole and checked first:
the first bad row raises, naming its line and column, and nothing is written. A good file is
upserted in one transaction (a terminal already in the directory takes the file's values),
with one audit entry for the import.

The simulator's terminals get places too (:func:`simulated_sites`): each around its town's
centre, seeded, online terminals without one; ``branchguard run --demo`` loads them.
"""

from __future__ import annotations

import csv
import io
import math
import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .. import audit, logs
from ..change import apply_change, connect_writer
from ..errors import BranchguardError, SettingsError
from ..feed.simulate import TOWN_CENTRES, terminal_layout
from ..store import require_db
from ..transaction import require_identifier

log = logs.get("appliance.terminal_directory")
COLUMNS = ("terminal_id", "name", "branch", "latitude", "longitude")
NAME_LIMIT = 200
SPREAD_KM = 3.0


@dataclass(frozen=True)
class Site:
    """One terminal's directory entry; ``latitude`` and ``longitude`` both set or both None."""

    terminal_id: str
    name: str
    branch: str
    latitude: float | None
    longitude: float | None


def _identifier(line: int, column: str, value: str) -> str:
    try:
        require_identifier(value, column)
    except SettingsError as exc:
        raise BranchguardError(f"line {line}: not a valid identifier", field=column,
                               value=value, hint=exc.hint) from None
    return value


def _degrees(line: int, column: str, value: str, limit: float) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and -limit <= number <= limit):
        raise BranchguardError(f"line {line}: not a {column} in degrees", field=column,
                               value=value, hint=f"a decimal number from {-limit:g} to "
                                                 f"{limit:g}, e.g. 60.1699")
    return number


def parse_site(line: int, row: dict[str, str]) -> Site:
    """One CSV row as a Site, or BranchguardError naming the line and the column."""
    terminal_id = _identifier(line, "terminal_id", row["terminal_id"])
    branch = _identifier(line, "branch", row["branch"])
    name = row["name"]
    if not name or len(name) > NAME_LIMIT:
        raise BranchguardError(f"line {line}: name must have 1 to {NAME_LIMIT} characters",
                               field="name", value=name)
    lat_text, lon_text = row["latitude"], row["longitude"]
    if not lat_text and not lon_text:
        return Site(terminal_id, name, branch, None, None)
    if not lat_text or not lon_text:
        raise BranchguardError(f"line {line}: latitude and longitude go together",
                               field="longitude" if lat_text else "latitude", value="",
                               hint="give both, or leave both empty for no fixed place")
    return Site(terminal_id, name, branch, _degrees(line, "latitude", lat_text, 90),
                _degrees(line, "longitude", lon_text, 180))


def read_sites(path: Path) -> list[Site]:
    """Every row of a terminals CSV, checked (see module doc); all or nothing."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BranchguardError(f"cannot read {path}: {exc}", field="path",
                               value=str(path)) from exc
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise BranchguardError("not a terminals file", field="header", value=header,
                               hint="expected the columns " + ",".join(COLUMNS))
    reader.fieldnames = header
    sites: list[Site] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        if None in row or any(row.get(c) is None for c in COLUMNS):
            raise BranchguardError(f"line {line}: expected {len(header)} columns",
                                   field="row", value=row)
        if not "".join(str(v) for v in row.values()).strip():
            continue
        site = parse_site(line, {c: row[c].strip() for c in COLUMNS})
        if site.terminal_id in seen:
            raise BranchguardError(f"line {line}: terminal listed twice (first on line "
                                   f"{seen[site.terminal_id]})", field="terminal_id",
                                   value=site.terminal_id)
        seen[site.terminal_id] = line
        sites.append(site)
    return sites


def save_sites(conn: sqlite3.Connection, sites: list[Site], actor: str, source: str) -> int:
    """Upsert ``sites`` and audit the import; call inside change.apply_change."""
    now = time.time()
    conn.executemany(
        "INSERT INTO terminals (terminal_id, name, branch, latitude, longitude, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (terminal_id) DO UPDATE SET name = "
        "excluded.name, branch = excluded.branch, latitude = excluded.latitude, longitude = "
        "excluded.longitude, updated_at = excluded.updated_at",
        [(s.terminal_id, s.name, s.branch, s.latitude, s.longitude, now) for s in sites])
    audit.append(conn, actor, "terminals.import", "terminals", None,
                 {"source": source, "terminals": len(sites),
                  "placed": sum(1 for s in sites if s.latitude is not None)})
    return len(sites)


@dataclass(frozen=True)
class ImportResult:
    terminals: int
    placed: int
    """Of which with a latitude and longitude."""


def write_sites(db_path: Path, sites: list[Site], actor: str, source: str) -> ImportResult:
    """Save ``sites`` into the node database at ``db_path`` in one audited transaction."""
    db = connect_writer(db_path)
    try:
        apply_change(db, lambda conn: save_sites(conn, sites, actor, source))
    finally:
        db.close()
    result = ImportResult(len(sites), sum(1 for s in sites if s.latitude is not None))
    log.info("terminals.imported", txn_id=None, source=source, terminals=result.terminals,
             placed=result.placed)
    return result


def import_terminals(db_path: Path, path: Path, actor: str = "cli") -> ImportResult:
    """``branchguard terminals import``: read and check ``path``, then save it (or nothing)."""
    require_db(db_path)
    return write_sites(db_path, read_sites(path), actor, f"file:{path.name}")


def simulated_sites(seed: int, *, accounts: int, terminals: int, branch: str) -> list[Site]:
    """The directory of the simulator's terminals for ``seed`` (see module doc)."""
    rng = random.Random(seed)
    out = []
    for terminal_id, channel, town in terminal_layout(seed, accounts=accounts,
                                                      terminals=terminals):
        name = f"{town} {channel} {terminal_id}"
        if channel == "ONLINE":
            out.append(Site(terminal_id, f"online merchant {terminal_id}", branch, None, None))
            continue
        lat, lon = TOWN_CENTRES[town]
        north, east = (rng.gauss(0.0, SPREAD_KM) for _ in range(2))
        out.append(Site(terminal_id, name, branch, round(lat + north / 111.0, 6),
                        round(lon + east / (111.0 * math.cos(math.radians(lat))), 6)))
    return out
