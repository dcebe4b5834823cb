"""The warm and cold tiers on disk, and the canonical row form their checksums are over.

- warm: one SQLite database per calendar month (UTC, by event time) at
  ``<archive_dir>/warm/YYYY-MM.db``, with the node's own schema, so the API queries it with
  the same SQL as the node database;
- cold: one gzip file of JSON lines per month at ``<archive_dir>/cold/YYYY-MM.jsonl.gz``
  with a manifest ``YYYY-MM.manifest.json`` holding its row counts, the SHA-256 of the file
  and the SHA-256 of its content. A cold file is never edited: it is written beside the old
  one, read back and verified, then renamed over it.

A row's canonical form is one line of JSON with sorted keys, ``{"table": ..., "row": {...}}``.
Moves compare (count, SHA-256 over the sorted canonical lines) of source and destination.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import sqlite3
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ArchiveError
from ..settings import Settings

MOVED_TABLES = ("transactions", "alerts")
"""What moves between tiers: each transaction with its alert (both keyed by transaction_id)."""
COLD_FORMAT = "branchguard-cold-1"


@dataclass(frozen=True)
class Digest:
    """Row count and SHA-256 over sorted canonical lines: what a move must preserve."""

    rows: int
    sha256: str


def canonical(table: str, row: dict[str, Any]) -> bytes:
    """One row as one line of JSON; a BLOB (stored features, a body digest, a dead
    letter's body) as ``{"base64": ...}``."""
    return json.dumps({"table": table, "row": row}, sort_keys=True, separators=(",", ":"),
                      default=_blob).encode()


def _blob(value: object) -> dict[str, str]:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    raise TypeError(f"{type(value).__name__} in a row")


def digest(lines: Iterable[bytes]) -> Digest:
    h = hashlib.sha256()
    n = 0
    for line in sorted(lines):
        h.update(line + b"\n")
        n += 1
    return Digest(n, h.hexdigest())


def row_account(line: bytes) -> str:
    return str(json.loads(line)["row"]["account_id"])


def row_table(line: bytes) -> str:
    return str(json.loads(line)["table"])


def read_rows(conn: sqlite3.Connection, schema: str, table: str, where: str = "1",
              params: Sequence[Any] = ()) -> list[bytes]:
    """Canonical lines of ``schema.table`` rows matching ``where``. ``where`` is built by
    this package from constants, never from input; values travel in ``params``."""
    cursor = conn.execute(f"SELECT * FROM {schema}.{table} WHERE {where}", params)  # noqa: S608
    names = [d[0] for d in cursor.description]
    return [canonical(table, dict(zip(names, row))) for row in cursor]


# --- months ---------------------------------------------------------------------------


def month_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m")


def month_bounds(month: str) -> tuple[float, float]:
    """[start, end) of a month as Unix seconds, UTC."""
    start = datetime.strptime(month, "%Y-%m").replace(tzinfo=timezone.utc)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 \
        else start.replace(month=start.month + 1)
    return start.timestamp(), end.timestamp()


# --- warm -----------------------------------------------------------------------------


def warm_dir(settings: Settings) -> Path:
    return settings.archive_path / "warm"


def warm_path(settings: Settings, month: str) -> Path:
    return warm_dir(settings) / f"{month}.db"


def warm_months(settings: Settings) -> list[str]:
    """Months that have a warm database, oldest first (the API queries these)."""
    return sorted(p.stem for p in warm_dir(settings).glob("????-??.db"))


def remove_warm(settings: Settings, month: str) -> None:
    path = warm_path(settings, month)
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


# --- cold -----------------------------------------------------------------------------


def cold_dir(settings: Settings) -> Path:
    return settings.archive_path / "cold"


def cold_path(settings: Settings, month: str) -> Path:
    return cold_dir(settings) / f"{month}.jsonl.gz"


def manifest_path(settings: Settings, month: str) -> Path:
    return cold_dir(settings) / f"{month}.manifest.json"


def cold_months(settings: Settings) -> list[str]:
    folder = cold_dir(settings)
    return sorted({p.name.removesuffix(".manifest.json")
                   for p in folder.glob("????-??.manifest.json")}
                  | {p.name.removesuffix(".jsonl.gz") for p in folder.glob("????-??.jsonl.gz")})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, final: Path, data: bytes) -> None:
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(final)


def write_cold(settings: Settings, month: str, lines: Sequence[bytes]) -> dict[str, Any]:
    """Write a month's cold file from ``lines``: compress, read back and verify (count and
    content checksum), then rename into place with its manifest. Returns the manifest."""
    expected = digest(lines)
    body = b"".join(line + b"\n" for line in sorted(lines))
    data = gzip.compress(body, compresslevel=9, mtime=0)
    if digest(gzip.decompress(data).splitlines()) != expected:
        raise ArchiveError("cold file does not read back as written", field="month",
                           value=month)
    folder = cold_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(month, data, lines, expected)
    # The file first, verified before its rename: a crash before the manifest's rename
    # leaves the new, complete file with the old manifest, which read_cold(repair=True)
    # rewrites from the file.
    _replace(folder / f".{month}.jsonl.gz.tmp", cold_path(settings, month), data)
    _write_manifest(settings, month, manifest)
    return manifest


def _manifest(month: str, data: bytes, lines: Sequence[bytes], content: Digest
              ) -> dict[str, Any]:
    counts = {t: 0 for t in MOVED_TABLES}
    for line in lines:
        counts[row_table(line)] += 1
    return {"format": COLD_FORMAT, "month": month, "rows": counts,
            "sha256": hashlib.sha256(data).hexdigest(), "content_sha256": content.sha256}


def _write_manifest(settings: Settings, month: str, manifest: dict[str, Any]) -> None:
    folder = cold_dir(settings)
    _replace(folder / f".{month}.manifest.tmp", manifest_path(settings, month),
             json.dumps(manifest, indent=2, sort_keys=True).encode())
    _fsync_dir(folder)


def read_cold(settings: Settings, month: str, repair: bool = False) -> list[bytes] | None:
    """A month's cold rows, verified against its manifest; None when there is no file.

    A file that does not match its manifest raises, unless ``repair`` and the file itself
    is sound (gzip checks its own CRC): that is a write interrupted between the file's
    rename and the manifest's, and the manifest is rewritten from the file."""
    path, mpath = cold_path(settings, month), manifest_path(settings, month)
    if not path.exists() and not mpath.exists():
        return None
    try:
        data = path.read_bytes()
        lines = gzip.decompress(data).splitlines()
        manifest = json.loads(mpath.read_text()) if mpath.exists() else {}
    except (OSError, ValueError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"cannot read cold file: {exc}", field="month", value=month,
                           hint=f"see {path}") from exc
    got = digest(lines)
    if (manifest.get("sha256") != hashlib.sha256(data).hexdigest()
            or manifest.get("content_sha256") != got.sha256
            or sum(manifest.get("rows", {}).values()) != got.rows):
        if not repair:
            raise ArchiveError("cold file does not match its manifest", field="month",
                               value=month, hint=f"see {path} and {mpath}")
        _write_manifest(settings, month, _manifest(month, data, lines, got))
    return lines


def cold_matches_manifest(settings: Settings, month: str) -> bool:
    """The file's SHA-256 is the one in its manifest (no decompression)."""
    try:
        manifest = json.loads(manifest_path(settings, month).read_text())
        data = cold_path(settings, month).read_bytes()
    except (OSError, ValueError):
        return False
    return bool(manifest.get("sha256") == hashlib.sha256(data).hexdigest())


def remove_cold(settings: Settings, month: str) -> None:
    cold_path(settings, month).unlink(missing_ok=True)
    manifest_path(settings, month).unlink(missing_ok=True)
    if cold_dir(settings).exists():
        _fsync_dir(cold_dir(settings))
