"""The key that signs the console's session cookie.

From configuration (``console_secret``) when set; otherwise generated once into
``<data_dir>/console-secret`` with mode 0600 and read from there on every later start, so
sessions survive a restart and no secret is ever written in code.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from appliance.errors import SettingsError
from appliance.settings import Settings

SECRET_FILE = "console-secret"  # noqa: S105 (a file name, not a secret)


def session_secret(settings: Settings) -> str:
    if settings.console_secret:
        return settings.console_secret
    path = settings.data_dir / SECRET_FILE
    if not path.exists():
        _create(path)
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise SettingsError("the generated console secret is too short", field="console_secret",
                            value=str(path), hint="delete the file to generate a new one")
    return secret


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process made it first
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(48) + "\n")
