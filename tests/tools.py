"""The operating-system tools some tests need (installed by .ci/install-tools). A missing
tool fails the test that needs it with the command that installs it, never skips it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

INSTALL = "run `make tools` (Debian packages systemd and prometheus, via .ci/install-tools)"


def tool(name: str) -> str:
    """Absolute path of ``name``: beside this interpreter (the virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: {INSTALL}", pytrace=False)
    return found
