"""The rules file: the typology rules' parameters, versioned, read into typed objects.

A rules file is TOML (``appliance/scoring/rules.toml`` is the shipped one; docs/rules.md
explains every key): a ``version`` string, stored with every verdict, and one table per
typology. :func:`parse` checks all of it (every key present, of its type and in its range,
no unknown key) and raises :class:`RulesError` naming the first key that is wrong, so a bad
file is refused whole, before anything uses it.

Where the scorer reads its rules (:func:`rules_path`): the ``rules_file`` setting when set,
else ``<data_dir>/rules.toml`` once a file has been deployed there, else the shipped file.
:func:`deploy` checks a file, installs it there atomically (temporary file, fsync, rename)
and writes an audit entry, as a model promotion does; the running scorer notices the new file
within ``model_check_seconds`` and switches between two batches (typologies.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .. import audit, logs
from ..change import apply_change, migrated_writer
from ..errors import BranchguardError
from ..settings import Settings

log = logs.get("appliance.rulebook")

SHIPPED_RULES = Path(__file__).resolve().parent / "rules.toml"
DEPLOYED_NAME = "rules.toml"
"""The file name :func:`deploy` installs under the data directory."""
MAX_WINDOW_SECONDS = 86400.0
"""The longest window a typology may use: the rules keep one day of each account."""
TYPOLOGIES = ("velocity_burst", "card_testing", "amount_spike", "impossible_travel",
              "atm_cashout", "new_terminal_large")
"""The typologies' reason codes, in the order their rules run (shared across issue 18)."""
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class RulesError(BranchguardError):
    """A rules file that cannot be used: ``field`` names the key (``card_testing.seconds``)."""


@dataclass(frozen=True, slots=True)
class VelocityBurst:
    enabled: bool
    count: int
    """Transactions of one account, this one included..."""
    seconds: float
    """...within this many seconds."""
    risk: float

    def checks(self) -> list[tuple[str, bool, str]]:
        return [("count", self.count >= 2, "use 2 or more"), _window(self.seconds)]


@dataclass(frozen=True, slots=True)
class CardTesting:
    enabled: bool
    small_amount: float
    """An amount at most this (in the node's currency) is small."""
    small_count: int
    """Small amounts, this one included, within ``seconds``; or..."""
    declines: int
    """...earlier transactions of the account the node declined within ``seconds``."""
    seconds: float
    risk: float

    def checks(self) -> list[tuple[str, bool, str]]:
        return [("small_amount", self.small_amount > 0, "use an amount > 0"),
                ("small_count", self.small_count >= 2, "use 2 or more"),
                ("declines", self.declines >= 1, "use 1 or more"), _window(self.seconds)]


@dataclass(frozen=True, slots=True)
class AmountSpike:
    enabled: bool
    multiple: float
    """Amount at least this many times the account's largest earlier amount..."""
    min_history: int
    """...once the account has this many earlier transactions."""
    risk: float

    def checks(self) -> list[tuple[str, bool, str]]:
        return [("multiple", self.multiple > 1, "use a multiple > 1"),
                ("min_history", self.min_history >= 1, "use 1 or more")]


@dataclass(frozen=True, slots=True)
class ImpossibleTravel:
    enabled: bool
    max_kmh: float
    """Faster than this (great-circle distance over the time between the two)..."""
    min_km: float
    """...over at least this distance."""
    risk: float

    def checks(self) -> list[tuple[str, bool, str]]:
        return [("max_kmh", self.max_kmh > 0, "use a speed > 0 km/h"),
                ("min_km", self.min_km >= 0, "use 0 or more km")]


@dataclass(frozen=True, slots=True)
class AtmCashout:
    enabled: bool
    terminals: int
    """Different ATMs, this one included..."""
    seconds: float
    """...within this many seconds."""
    risk: float

    def checks(self) -> list[tuple[str, bool, str]]:
        return [("terminals", self.terminals >= 2, "use 2 or more"), _window(self.seconds)]


@dataclass(frozen=True, slots=True)
class NewTerminalLarge:
    enabled: bool
    multiple: float
    """First use of a terminal with an amount at least this many times the account's
    median..."""
    min_amount: float
    """...and at least this amount..."""
    min_history: int
    """...once the account has this many earlier transactions."""
    risk: float

    def checks(self) -> list[tuple[str, bool, str]]:
        return [("multiple", self.multiple > 1, "use a multiple > 1"),
                ("min_amount", self.min_amount >= 0, "use 0 or more"),
                ("min_history", self.min_history >= 1, "use 1 or more")]


def _window(seconds: float) -> tuple[str, bool, str]:
    return ("seconds", 0 < seconds <= MAX_WINDOW_SECONDS,
            f"use a window of more than 0 and at most {MAX_WINDOW_SECONDS:g} seconds")


@dataclass(frozen=True, slots=True)
class Rulebook:
    """One rules file, checked: what the typology rules read."""

    version: str
    velocity_burst: VelocityBurst
    card_testing: CardTesting
    amount_spike: AmountSpike
    impossible_travel: ImpossibleTravel
    atm_cashout: AtmCashout
    new_terminal_large: NewTerminalLarge
    sha256: str
    """Of the file's bytes (in the audit entry of a deploy)."""


_SECTIONS: dict[str, type[Any]] = {
    "velocity_burst": VelocityBurst, "card_testing": CardTesting, "amount_spike": AmountSpike,
    "impossible_travel": ImpossibleTravel, "atm_cashout": AtmCashout,
    "new_terminal_large": NewTerminalLarge}


def _value(key: str, kind: Any, raw: object) -> object:
    """``raw`` as ``kind`` (bool, int or float), or RulesError naming ``key``."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        raise RulesError("not true or false", field=key, value=raw, hint="use true or false")
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise RulesError("not a number", field=key, value=raw, hint="use a number")
    if kind is int:
        if not isinstance(raw, int):
            raise RulesError("not a whole number", field=key, value=raw, hint="use e.g. 5")
        return raw
    value = float(raw)
    if value != value or value in (float("inf"), float("-inf")):
        raise RulesError("not a finite number", field=key, value=raw)
    return value


def _section(table: dict[str, Any], name: str, cls: type[Any]) -> Any:
    raw = table.get(name)
    if not isinstance(raw, dict):
        raise RulesError("missing table" if raw is None else "not a table", field=name,
                         hint=f"add a [{name}] table (see the shipped rules.toml)")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in raw:
        if key not in names:
            raise RulesError("unknown key", field=f"{name}.{key}",
                             hint=f"the keys of [{name}] are {', '.join(names)}")
    values: dict[str, object] = {}
    for field_name in names:
        key = f"{name}.{field_name}"
        if field_name not in raw:
            raise RulesError("missing key", field=key, hint="every key of a table is required")
        values[field_name] = _value(key, hints[field_name], raw[field_name])
    params = cls(**values)
    risk = params.risk
    if not 0 < risk < 1:
        raise RulesError("out of range", field=f"{name}.risk", value=risk,
                         hint="use a risk above 0 and below 1")
    for attr, ok, hint in params.checks():
        if not ok:
            raise RulesError("out of range", field=f"{name}.{attr}",
                             value=getattr(params, attr), hint=hint)
    return params


def parse(text: str, source: str = "rules file") -> Rulebook:
    """A checked :class:`Rulebook` from TOML text, or :class:`RulesError` naming the key."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"not valid TOML: {exc}", field="file", value=source) from None
    for key in table:
        if key != "version" and key not in _SECTIONS:
            raise RulesError("unknown key", field=key,
                             hint=f"the tables are {', '.join(TYPOLOGIES)}, and version")
    version = table.get("version")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise RulesError("missing or not a version name" if version is None
                         else "not a version name", field="version", value=version,
                         hint='use a short name such as "rules-v3" (letters, digits, . _ -)')
    sections = {name: _section(table, name, cls) for name, cls in _SECTIONS.items()}
    return Rulebook(version=version, sha256=hashlib.sha256(text.encode()).hexdigest(),
                    **sections)


def load(path: Path) -> Rulebook:
    """Read and check the rules file at ``path`` (RulesError if unreadable or wrong)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"cannot read the rules file: {exc}", field="rules_file",
                         value=str(path)) from None
    return parse(text, str(path))


def rules_path(settings: Settings) -> Path:
    """The file the scorer reads its rules from (see the module docstring)."""
    if settings.rules_file is not None:
        return settings.rules_file
    deployed = settings.data_dir / DEPLOYED_NAME
    return deployed if deployed.exists() else SHIPPED_RULES


def deploy_target(settings: Settings) -> Path:
    """Where :func:`deploy` installs a file: ``rules_file`` when set, else the data dir's."""
    return settings.rules_file or settings.data_dir / DEPLOYED_NAME


@dataclass(frozen=True)
class Deployed:
    path: Path
    previous: str | None
    """The version in force before (None when the file in force could not be read)."""
    version: str
    sha256: str


def _install(source_text: str, target: Path) -> None:
    """Write ``target`` atomically: temporary file, fsync, rename, fsync of the directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(source_text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(conn: sqlite3.Connection, settings: Settings, text: str, source: str,
            actor: str, reason: str) -> Deployed:
    """Check ``text`` and install it as the rules in force, with its audit entry
    (``rules.deploy``, subject ``rules:<version>``); call inside change.apply_change, so
    the entry is committed only if the file was installed. Nothing changes on a bad file."""
    book = parse(text, source)
    try:
        before: Rulebook | None = load(rules_path(settings))
    except RulesError:
        before = None
    target = deploy_target(settings)
    _install(text, target)
    audit.append(conn, actor, "rules.deploy", f"rules:{book.version}",
                 None if before is None else {"version": before.version,
                                              "sha256": before.sha256},
                 {"version": book.version, "sha256": book.sha256, "path": str(target),
                  "source": source, "reason": reason})
    return Deployed(target, None if before is None else before.version, book.version,
                    book.sha256)


def deploy(settings: Settings, path: Path, actor: str, reason: str = "manual") -> Deployed:
    """``branchguard rules deploy``: check the file at ``path``, install it where the
    scorer reads it and audit the change, in one database transaction."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"cannot read the rules file: {exc}", field="file",
                         value=str(path)) from None
    parse(text, str(path))  # refuse a bad file before touching the database
    db = migrated_writer(settings.db_path)
    try:
        done = apply_change(db, lambda conn: install(conn, settings, text, path.name, actor,
                                                     reason))
    finally:
        db.close()
    log.info("rules.deployed", txn_id=None, version=done.version, previous=done.previous,
             path=str(done.path), actor=actor)
    return done


def rules_history(conn: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
    """The audited rules deployments, newest first."""
    return [audit.entry_dict(r) for r in conn.execute(
        "SELECT seq, at, actor, action, subject, before, after, prev_hash, hash FROM audit_log "
        "WHERE action = 'rules.deploy' ORDER BY seq DESC LIMIT ?", (limit,))]


def describe(settings: Settings) -> dict[str, Any]:
    """``branchguard rules show``: the rules file in force, its version and parameters."""
    path = rules_path(settings)
    book = load(path)
    return {"path": str(path), "version": book.version, "sha256": book.sha256,
            **{name: {f.name: getattr(getattr(book, name), f.name)
                      for f in fields(_SECTIONS[name])} for name in TYPOLOGIES}}
