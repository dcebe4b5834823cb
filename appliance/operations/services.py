"""Our own commands as children of ``branchguard run``: the analyst API (``branchguard
serve``) and the alert dispatcher (``branchguard alerts run``).

Each runs as ``python -m appliance <command>`` with exactly the node's settings (passed as
``BRANCHGUARD_*`` variables), so its work never competes with the scorer's event loop and a
crash in it never stops scoring. Their log lines go to the node's own stderr.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import sys
import urllib.error
import urllib.request

from .. import logs
from ..errors import NodeError
from ..settings import Settings
from .child import Child, settings_env, wait_ready

log = logs.get("appliance.runner")


class ApiServer(Child):
    """The API and console. The node binds the listening socket once and hands it to every
    API child it starts: a killed API's successor serves the same port (also when
    ``api_port`` is 0), and clients that connect meanwhile wait in the socket's backlog
    instead of being refused."""

    name = "api"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.socket: socket.socket | None = None

    @property
    def port(self) -> int | None:
        return int(self.socket.getsockname()[1]) if self.socket is not None else None

    @property
    def address(self) -> str:
        """Where the node itself reaches it (loopback when it listens on every address)."""
        host = self.socket.getsockname()[0] if self.socket is not None else ""
        return "127.0.0.1" if host in ("", "0.0.0.0") else str(host)  # noqa: S104

    def bind(self) -> socket.socket:
        """Bind the listening socket (once) and return it."""
        if self.socket is None:
            from ..api.app import bind

            try:
                self.socket = bind(self.settings)
            except OSError as exc:
                raise NodeError(f"cannot listen on {self.settings.api_host}:"
                                f"{self.settings.api_port}: {exc.strerror}",
                                field="api_port", value=self.settings.api_port,
                                hint="is another node or `branchguard serve` using it? Set "
                                     "api_port, or run_api = false") from exc
        return self.socket

    def start(self, timeout: float = 60.0) -> None:
        listening = self.bind()
        port, fd = int(listening.getsockname()[1]), listening.fileno()
        process = self.spawn([sys.executable, "-m", "appliance", "serve", "--fd", str(fd)],
                             env=settings_env(dataclasses.replace(self.settings,
                                                                  api_port=port)),
                             pass_fds=[fd])
        if wait_ready(process, self._answers, timeout, lambda code: NodeError(
                f"the API exited with code {code}", hint="see its log lines above")) is None:
            self.stop()
            raise NodeError("the API did not answer /healthz", hint="see its log lines above")

    def _answers(self) -> bool | None:
        """True once ``/healthz`` answers 200 through the socket (a request made while the
        child is starting waits in the backlog: at most a second per try)."""
        tls = self.settings.api_tls_cert is not None
        url = f"{'https' if tls else 'http'}://{self.address}:{self.port}/healthz"
        context = ssl._create_unverified_context() if tls else None  # noqa: S323 (loopback)
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:  # noqa: S310
                return True if response.status == 200 else None
        except (OSError, urllib.error.URLError):
            return None

    def close(self) -> None:
        """After the last child stopped: give the port back."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None


class AlertDispatcher(Child):
    """The alert dispatcher; alerts must not stop for good because of one bad moment, and
    scoring never waits for them. Ready once started: it only reads the outbox."""

    name = "alerts"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def start(self, timeout: float = 15.0) -> None:
        self.spawn([sys.executable, "-m", "appliance", "alerts", "run"],
                   env=settings_env(self.settings))

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then wait: the dispatcher marks what it sent and exits."""
        return super().stop(timeout)
