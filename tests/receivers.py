"""Real local receivers for alert deliveries: an HTTP server (Apprise ``json://`` and
``form://``) and an SMTP server (aiosmtpd, for ``mailto://``), on 127.0.0.1 and free ports."""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class Received:
    path: str
    title: str
    body: str


@dataclass
class HttpReceiver:
    """Records every POST; ``fail_first[path]`` answers 500 that many times first;
    ``hold`` (when set) makes it record a message and then wait before answering."""

    fail_first: dict[str, int] = field(default_factory=dict)
    hold: threading.Event | None = None
    received: list[Received] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    server: ThreadingHTTPServer | None = None

    def start(self) -> HttpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.attempts[self.path] = receiver.attempts.get(self.path, 0) + 1
                if receiver.fail_first.get(self.path, 0) > 0:
                    receiver.fail_first[self.path] -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    payload = json.loads(data)
                else:
                    payload = {k: v[0] for k, v in urllib.parse.parse_qs(data.decode()).items()}
                receiver.received.append(Received(self.path, payload["title"],
                                                  payload["message"]))
                if receiver.hold is not None:
                    receiver.hold.wait(60)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SmtpReceiver:
    """aiosmtpd on a free loopback port; ``received`` holds (to, subject, body)."""

    def __init__(self) -> None:
        self.received: list[tuple[list[str], str, str]] = []
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        part = message.get_body(preferencelist=("plain",))
        body = part.get_content() if part is not None else ""
        self.received.append((list(envelope.rcpt_tos), str(message["Subject"]), body))
        return "250 OK"

    def start(self) -> SmtpReceiver:
        self.controller.start()
        return self

    def url(self, to: str = "fraud@bank.example") -> str:
        return (f"mailto://127.0.0.1:{self.port}?from=branchguard@branch.example&to={to}"
                "&mode=insecure")

    def stop(self) -> None:
        self.controller.stop()


def wait_for(predicate: Any, timeout: float = 30.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {message}")
