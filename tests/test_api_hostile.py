"""Hostile and malformed requests against the real server (``branchguard serve``, console
mounted): each gets the answer in the table, none a 5xx, and the server logs no error and
still serves afterwards. The table is the API's part of the bad-input record of issue 17."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from appliance.casework import keys
from appliance.change import connect_writer
from appliance.store import Store
from tests.api_support import ServeProcess, api_settings, fill

JSON = {"Content-Type": "application/json"}
SUP_LIST = {"list": "deny", "kind": "terminal", "reason": "x"}


@dataclass(frozen=True)
class Hostile:
    name: str
    method: str
    path: str
    status: int
    role: str | None = "analyst"
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


CASES = [
    # bodies: not JSON, not an object, wrong types, out of range, unknown, twice
    Hostile("bad JSON", "PATCH", "/api/v1/alerts/1", 400, content=b"{not json"),
    Hostile("JSON array", "PATCH", "/api/v1/alerts/1", 400, content=b"[1, 2]"),
    Hostile("empty body", "PATCH", "/api/v1/alerts/1", 400, content=b""),
    Hostile("invalid UTF-8", "POST", "/api/v1/alerts/1/notes", 400,
            content=b'{"text": "\xff\xfe"}'),
    Hostile("lone surrogate", "POST", "/api/v1/alerts/1/notes", 400,
            content=b'{"text": "\\ud800"}'),
    Hostile("NaN", "PATCH", "/api/v1/alerts/1", 400, content=b'{"version": NaN}'),
    Hostile("number 1e309", "PATCH", "/api/v1/alerts/1", 400, content=b'{"version": 1e309}'),
    Hostile("version as a string", "PATCH", "/api/v1/alerts/1", 400, json={"version": "1"}),
    Hostile("version 2**70", "PATCH", "/api/v1/alerts/1", 400, json={"version": 2**70}),
    Hostile("version true", "PATCH", "/api/v1/alerts/1", 400, json={"version": True}),
    Hostile("unknown field", "PATCH", "/api/v1/alerts/1", 400, json={"version": 1, "x": 1}),
    Hostile("key twice", "PATCH", "/api/v1/alerts/1", 400,
            content=b'{"version": 1, "status": "INVESTIGATING", "status": "NEW"}'),
    Hostile("nesting 100,000 deep", "POST", "/api/v1/alerts/1/notes", 400,
            content=b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    Hostile("status lower case", "PATCH", "/api/v1/alerts/1", 400,
            json={"version": 1, "status": "investigating"}),
    Hostile("transition not allowed", "PATCH", "/api/v1/alerts/1", 422,
            json={"version": 1, "status": "CONFIRMED_FRAUD"}),
    Hostile("NEW to NEW (a no-op)", "PATCH", "/api/v1/alerts/1", 200,
            json={"version": 1, "status": "NEW"}),
    Hostile("stale version", "PATCH", "/api/v1/alerts/1", 409,
            json={"version": 7, "status": "INVESTIGATING"}),
    # text people write on a case
    Hostile("assignee <script>", "PATCH", "/api/v1/alerts/1", 422,
            json={"version": 1, "assignee": "<script>alert(1)</script>"}),
    Hostile("assignee with BEL", "PATCH", "/api/v1/alerts/1", 422,
            json={"version": 1, "assignee": "ana\u0007"}),
    Hostile("assignee with NUL", "PATCH", "/api/v1/alerts/1", 400,
            json={"version": 1, "assignee": "ana\u0000"}),
    Hostile("assignee right-to-left override", "PATCH", "/api/v1/alerts/1", 422,
            json={"version": 1, "assignee": "\u202eana"}),
    Hostile("assignee 101 characters", "PATCH", "/api/v1/alerts/1", 400,
            json={"version": 1, "assignee": "a" * 101}),
    Hostile("note of spaces", "POST", "/api/v1/alerts/1/notes", 422, json={"text": "   "}),
    Hostile("note with ESC", "POST", "/api/v1/alerts/1/notes", 422,
            json={"text": "\u001b[31mred"}),
    Hostile("note 4001 characters", "POST", "/api/v1/alerts/1/notes", 400,
            json={"text": "x" * 4001}),
    Hostile("bulk scope unknown", "POST", "/api/v1/alerts/1/bulk", 400,
            json={"version": 1, "scope": "bank", "status": "INVESTIGATING"}),
    # query parameters
    Hostile("limit 0", "GET", "/api/v1/alerts?limit=0", 400, role="viewer"),
    Hostile("limit 10**30", "GET", "/api/v1/alerts?limit=" + "1" + "0" * 30, 400,
            role="viewer"),
    Hostile("min_risk nan", "GET", "/api/v1/alerts?min_risk=nan", 400, role="viewer"),
    Hostile("since year 99999", "GET", "/api/v1/alerts?since=99999-01-01T00:00:00", 400,
            role="viewer"),
    Hostile("until inf", "GET", "/api/v1/alerts?until=inf", 400, role="viewer"),
    Hostile("parameter twice", "GET", "/api/v1/alerts?limit=1&limit=2", 400, role="viewer"),
    Hostile("unknown parameter", "GET", "/api/v1/alerts?lmit=1", 400, role="viewer"),
    Hostile("sort with SQL", "GET", "/api/v1/alerts?sort=risk;DROP%20TABLE%20alerts", 400,
            role="viewer"),
    Hostile("forged cursor", "GET", "/api/v1/alerts?cursor=eyJhIjoxfQ", 400, role="viewer"),
    Hostile("account id with NUL", "GET", "/api/v1/alerts?account_id=A%00B", 400,
            role="viewer"),
    Hostile("account id with SQL", "GET", "/api/v1/alerts?account_id=%27%20OR%201=1--", 200,
            role="viewer"),
    # ids and paths
    Hostile("alert id 0", "GET", "/api/v1/alerts/0", 404, role="viewer"),
    Hostile("alert id 10**23", "GET", "/api/v1/alerts/99999999999999999999999", 404,
            role="viewer"),
    Hostile("alert id -1", "GET", "/api/v1/alerts/-1", 404, role="viewer"),
    Hostile("unknown alert", "PATCH", "/api/v1/alerts/999999", 404,
            json={"version": 1, "status": "INVESTIGATING"}),
    Hostile("path traversal", "GET", "/api/v1/alerts/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404,
            role="viewer"),
    Hostile("path traversal in an account id", "GET",
            "/api/v1/accounts/..%2F..%2Fetc%2Fpasswd/transactions", 404, role="viewer"),
    Hostile("path traversal into the console's files", "GET",
            "/console/_nicegui/3.18.0/static/..%2f..%2f..%2f..%2fetc%2fpasswd", 404,
            role=None),
    Hostile("console page, anonymous", "GET", "/console/alerts/99999999999999999999", 303,
            role=None),
    Hostile("key id with a path", "POST", "/api/v1/keys/..%2f..%2f/revoke", 404,
            role="admin"),
    Hostile("list entry expiring in 1e308", "POST", "/api/v1/lists", 400, role="supervisor",
            json={**SUP_LIST, "value": "T1", "expires_at": 1e308}),
    Hostile("method DELETE on an alert", "DELETE", "/api/v1/alerts/1", 405),
    # headers
    Hostile("Basic authorization", "GET", "/api/v1/alerts", 401, role=None,
            headers={"Authorization": "Basic YTpi"}),
    Hostile("a 10 KB key", "GET", "/api/v1/alerts", 401, role=None,
            headers={"Authorization": "Bearer " + "x" * 10_000}),
    Hostile("X-Forwarded-For garbage", "GET", "/healthz", 200, role=None,
            headers={"X-Forwarded-For": "not-an-ip, ::::, 999.1.1.1"}),
    Hostile("200 headers", "GET", "/healthz", 200, role=None,
            headers={f"X-H{i}": "v" * 100 for i in range(200)}),
    Hostile("a 100 KB header", "GET", "/healthz", 431, role=None,
            headers={"X-Big": "v" * 100_000}),
    Hostile("body of 2 MB", "POST", "/api/v1/alerts/1/notes", 413,
            content=b'{"text": "' + b"x" * 2_000_000 + b'"}'),
]

RAW = [  # what no HTTP client would send: answered by the server's parser
    ("not HTTP", b"HELLO\r\n\r\n", 400),
    ("Content-Length abc", b"POST /api/v1/alerts/1/notes HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Length: abc\r\n\r\n", 400),
    ("Content-Length and chunked", b"POST /api/v1/alerts/1/notes HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"0\r\n\r\n", 400),
    ("NUL in the path", b"GET /api/v1/alerts\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("empty Bearer", b"GET /api/v1/alerts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\n"
                     b"\r\n", 401),
    ("a 100 KB URL", b"GET /api/v1/alerts?account_id=" + b"A" * 100_000 + b" HTTP/1.1\r\n"
                     b"Host: x\r\n\r\n", 431),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[ServeProcess, dict[str, str]]]:
    settings = api_settings(tmp_path_factory.mktemp("hostile"))
    store = Store.open(settings.db_path)
    fill(store, 60)
    store.close()
    writer = connect_writer(settings.db_path)
    made = {role: keys.create(writer, role, role, "test")[1]
            for role in ("viewer", "analyst", "supervisor", "admin")}
    server = ServeProcess.start(settings)
    try:
        yield server, made
    finally:
        assert server.stop() == 0
        log = Path(server.log_path).read_text()
        assert '"level":"ERROR"' not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_hostile_request_gets_its_answer_and_never_a_5xx(
        served: tuple[ServeProcess, dict[str, str]], case: Hostile) -> None:
    server, made = served
    headers = {**JSON, **case.headers}
    if case.role is not None:
        headers["Authorization"] = f"Bearer {made[case.role]}"
    r = httpx.request(case.method, server.url + case.path, headers=headers, json=case.json,
                      content=case.content, timeout=60)
    assert r.status_code == case.status, r.text[:300]
    if case.path.startswith("/api/") and r.status_code >= 400:
        assert r.json()["error"]["status"] == case.status  # a JSON error naming what


@pytest.mark.parametrize(("name", "data", "status"), RAW, ids=[r[0] for r in RAW])
def test_each_malformed_request_gets_its_answer_and_never_a_5xx(
        served: tuple[ServeProcess, dict[str, str]], name: str, data: bytes,
        status: int) -> None:
    server, _ = served
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(data)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:200]


def test_the_server_still_serves_after_them(served: tuple[ServeProcess, dict[str, str]]
                                            ) -> None:
    server, made = served
    r = httpx.get(server.url + "/api/v1/alerts?limit=1",
                  headers={"Authorization": f"Bearer {made['viewer']}"}, timeout=30)
    assert r.status_code == 200 and r.json()["count"] == 1
