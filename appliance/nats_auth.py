"""NATS authentication and TLS for the node's nats-server, and the node's own credentials.

``nats_auth_file`` names a TOML file (a secret: keep it 0640 root:branchguard, outside the
repository; Ansible writes it from the inventory's vault):

.. code-block:: toml

    [node]                      # the scorer, API, alert dispatcher: everything on the box
    user = "node"
    password = "..."

    [terminal_groups.atm-north] # one user per group of terminals
    password = "..."            # plaintext, or a bcrypt hash ("$2a$..."), which nats-server takes
    terminals = ["ATM01", "ATM02"]

A terminal group may publish only to ``tx.<branch>.<terminal>.>`` of its own terminals and
subscribe only to their ``verdict.<branch>.<terminal>`` and to reply inboxes (``_INBOX.>``,
where JetStream's publish acknowledgements arrive). The node may do anything.

TLS: with ``nats_tls_cert`` and ``nats_tls_key`` the server requires TLS from every client;
the node verifies the server against ``nats_tls_ca`` (or the system's roots).
"""

from __future__ import annotations

import json
import re
import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SettingsError
from .settings import Settings

_IDENTIFIER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class TerminalGroup:
    name: str
    password: str
    terminals: tuple[str, ...]


@dataclass(frozen=True)
class NatsAuth:
    node_user: str
    node_password: str
    groups: tuple[TerminalGroup, ...]


def load_auth(path: Path) -> NatsAuth:
    """Read and check the auth file; errors name the file's key that is wrong."""
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read NATS auth file: {exc}", field="nats_auth_file",
                            value=str(path)) from exc

    def text(value: object, key: str, identifier: bool = False) -> str:
        if not isinstance(value, str) or not value or (identifier and not
                                                       _IDENTIFIER.match(value)):
            raise SettingsError("missing or invalid", field=f"nats_auth_file: {key}",
                                hint="letters, digits, '-' and '_'" if identifier else
                                "a non-empty string")
        return value

    node = table.get("node", {})
    groups = []
    for name, group in table.get("terminal_groups", {}).items():
        terminals = group.get("terminals")
        if not isinstance(terminals, list) or not terminals:
            raise SettingsError("missing or empty", field=f"nats_auth_file: terminal_groups."
                                f"{name}.terminals", hint="a list of terminal ids")
        groups.append(TerminalGroup(
            name=text(name, "terminal_groups", identifier=True),
            password=text(group.get("password"), f"terminal_groups.{name}.password"),
            terminals=tuple(text(t, f"terminal_groups.{name}.terminals", identifier=True)
                            for t in terminals)))
    return NatsAuth(node_user=text(node.get("user"), "node.user", identifier=True),
                    node_password=text(node.get("password"), "node.password"),
                    groups=tuple(groups))


def permissions(group: TerminalGroup, branch: str) -> dict[str, Any]:
    """What one terminal group may do: publish its own transactions, read its verdicts."""
    return {
        "publish": {"allow": [f"tx.{branch}.{t}.>" for t in group.terminals]},
        "subscribe": {"allow": ["_INBOX.>", *(f"verdict.{branch}.{t}" for t in group.terminals)]},
    }


def server_blocks(settings: Settings) -> str:
    """The ``authorization`` and ``tls`` blocks of nats-server.conf (empty when unset).
    The config format accepts JSON values, so they are written with ``json.dumps``."""
    out = ""
    if settings.nats_auth_file is not None:
        auth = load_auth(settings.nats_auth_file)
        users: list[dict[str, Any]] = [{"user": auth.node_user,
                                        "password": auth.node_password}]
        users += [{"user": g.name, "password": g.password,
                   "permissions": permissions(g, settings.branch)} for g in auth.groups]
        out += f"authorization {{\n  users: {json.dumps(users, indent=2)}\n}}\n"
    if settings.nats_tls_cert is not None and settings.nats_tls_key is not None:
        tls: dict[str, Any] = {"cert_file": str(settings.nats_tls_cert.resolve()),
               "key_file": str(settings.nats_tls_key.resolve()), "timeout": 2}
        if settings.nats_tls_ca is not None:
            tls["ca_file"] = str(settings.nats_tls_ca.resolve())
        out += f"tls: {json.dumps(tls)}\n"
    return out


def client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for the node's own NATS connections (user, password, TLS)."""
    options: dict[str, Any] = {}
    if settings.nats_auth_file is not None:
        auth = load_auth(settings.nats_auth_file)
        options.update(user=auth.node_user, password=auth.node_password)
    if settings.nats_tls_ca is not None or settings.nats_tls_cert is not None:
        options["tls"] = ssl.create_default_context(
            cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca is not None else None)
    return options
