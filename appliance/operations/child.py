"""Stopping a child process the polite way first: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess


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
