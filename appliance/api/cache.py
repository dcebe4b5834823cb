"""The response cache for alert lists, stats and account history (diskcache, so it is
shared safely by every thread and process that opens the same directory).

A cached response is keyed by route, query and the database's *generation token*, read in
the same read transaction as the response itself: the API's generation row (bumped in the
same transaction as every API write, see change.py) plus the largest alert id, transaction
rowid and dead-letter sequence (which every scorer commit that adds rows moves: rows are
never deleted). So a response is served from the cache only while the database still holds
exactly what it was computed from; any committed change, the scorer's or an analyst's, makes
the next request miss. One tiny indexed query per request buys that.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import diskcache

GENERATION_SQL = ("SELECT (SELECT value FROM api_generation), (SELECT max(alert_id) FROM alerts), "
             "(SELECT max(rowid) FROM transactions), (SELECT max(stream_seq) FROM dead_letters)")


def generation_token(conn: sqlite3.Connection) -> str:
    row = conn.execute(GENERATION_SQL).fetchone()
    return ":".join("-" if v is None else str(v) for v in row)


class ResponseCache:
    def __init__(self, directory: Path, expire_seconds: float) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.cache = diskcache.Cache(str(directory), size_limit=256 << 20)
        self.expire = expire_seconds

    def get(self, key: str) -> bytes | None:
        value = self.cache.get(key)
        return value if isinstance(value, bytes) else None

    def put(self, key: str, body: bytes) -> None:
        self.cache.set(key, body, expire=self.expire)

    def close(self) -> None:
        self.cache.close()
