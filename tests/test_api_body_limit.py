"""Request bodies above ``api_max_body_bytes`` are refused with 413 before they are read,
by the real server (``branchguard serve``, uvicorn): a declared Content-Length over the
limit is answered at once, before any of the body is sent, and a chunked body is counted
as it arrives and refused as soon as it passes the limit, not at its end. The console,
mounted on the same app, is covered too."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from appliance.casework import keys
from appliance.change import connect_writer
from appliance.settings import Settings
from appliance.store import Store
from tests.api_support import ServeProcess, api_settings, fill

LIMIT = 4096


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, str]]:
    """``branchguard serve`` (console included) with a 4 KiB body limit, and an analyst key."""
    settings: Settings = api_settings(tmp_path_factory.mktemp("limit"))
    store = Store.open(settings.db_path)
    fill(store, 30)
    store.close()
    key = keys.create(connect_writer(settings.db_path), "k", "analyst", "test")[1]
    server = ServeProcess.start(settings, {"BRANCHGUARD_API_MAX_BODY_BYTES": str(LIMIT)})
    try:
        yield server, key
    finally:
        assert server.stop() == 0


def raw_request(url: str, head: str, chunks: Iterator[bytes] = iter(())) -> bytes:
    """Send ``head`` (request line and headers), then ``chunks`` for as long as the server
    reads them, and return what the server answers (at most 64 KiB, waiting at most 30 s:
    a server that waits for the rest of the body never answers, and that is the failure)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n")
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        answer = b""
        try:
            while len(answer) < 65536:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
                if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                    break
        except ConnectionResetError:
            pass
        return answer


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_sent(
        served: tuple[ServeProcess, str]) -> None:
    server, key = served
    head = (f"POST /api/v1/alerts/1/notes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}"
            f"\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n")
    answer = raw_request(server.url, head)  # not one byte of the 50 MB is sent
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b'"field":"body"' in answer and b"connection: close" in answer.lower()


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(
        served: tuple[ServeProcess, str]) -> None:
    server, key = served
    head = (f"PATCH /api/v1/alerts/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
    chunk = b" " * 1024
    # twice the limit, and never the final zero-length chunk: a server that reads to the end
    # of the body waits for ever
    chunks = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2 * LIMIT // 1024))
    answer = raw_request(server.url, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]


def test_bodies_within_the_limit_are_served(served: tuple[ServeProcess, str]) -> None:
    server, key = served
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = b'{"text": "a note"}'
    fits = body + b" " * (LIMIT - len(body))
    r = httpx.post(server.url + "/api/v1/alerts/2/notes", content=fits, headers=auth,
                   timeout=30)
    assert r.status_code == 201, r.text
    over = httpx.post(server.url + "/api/v1/alerts/2/notes", content=fits + b" ",
                      headers=auth, timeout=30)
    assert over.status_code == 413 and over.json()["error"]["field"] == "body"

    def streamed() -> Iterator[bytes]:  # chunked (no Content-Length), within the limit
        yield body
        yield b" " * 100
    r = httpx.post(server.url + "/api/v1/alerts/2/notes", content=streamed(), headers=auth,
                   timeout=30)
    assert r.status_code == 201, r.text


def test_the_console_is_covered_too(served: tuple[ServeProcess, str]) -> None:
    server, _ = served
    head = ("POST /console/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 50000000\r\n")
    assert raw_request(server.url, head).startswith(b"HTTP/1.1 413")
    r = httpx.post(server.url + "/console/_nicegui_ws/socket.io/?EIO=4&transport=polling",
                   content=b"x" * (LIMIT + 1), timeout=30)
    assert r.status_code == 413


def test_a_request_head_over_64_kib_is_431_before_it_is_all_read(
        served: tuple[ServeProcess, str]) -> None:
    """Headers are not a way round the body limit: a 20 MB header is refused once 64 KiB of
    it have arrived (the server closes the connection), and a normal head is served."""
    server, _ = served
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            for _ in range(20 * 16):  # 20 MB, 64 KiB at a time, never the end of the head
                sock.sendall(b"v" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 431"), (sent, answer[:200])
    assert sent < 20 * 1024 * 1024  # it stopped reading well before the end
    ok = httpx.get(server.url + "/healthz", headers={"X-Fine": "v" * 8000}, timeout=30)
    assert ok.status_code == 200
