"""Which destinations each severity goes to, from the settings (and an Apprise config file).

A destination is one Apprise service: anything Apprise supports (Slack, Teams, Discord,
email, generic JSON/form webhooks...). The settings ``alerts_critical``, ``alerts_high`` and
``alerts_warning`` each list Apprise URLs, or tags naming services in the Apprise
configuration file ``alerts_config``. CRITICAL and HIGH are sent as they come (grouped in
bursts); WARNING goes into the periodic digest. INFO never raises an alert, so nothing routes
it. A destination is keyed by a hash of its URL: the database never holds the URL's secrets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import apprise

from ..errors import SettingsError
from ..settings import Settings
from .outbox import Route

DIGEST_SEVERITIES = frozenset({"WARNING"})
ROUTED_SEVERITIES = ("CRITICAL", "HIGH", "WARNING")


@dataclass(frozen=True)
class Destination:
    """One Apprise service and the severities routed to it."""

    key: str
    """Stable id: a hash of the full URL (which may hold secrets, so is never stored)."""
    label: str
    """The URL with secrets masked (Apprise's privacy form), for logs and people."""
    service: Any
    """The Apprise service object (``apprise.plugins.NotifyBase``); ``notify`` sends."""
    severities: frozenset[str]


def severity_setting(severity: str) -> str:
    return f"alerts_{severity.lower()}"


def _config_services(settings: Settings) -> apprise.Apprise | None:
    if settings.alerts_config is None:
        return None
    config = apprise.AppriseConfig()
    if not settings.alerts_config.exists() or not config.add(str(settings.alerts_config)):
        raise SettingsError("cannot read the Apprise configuration file",
                            field="alerts_config", value=str(settings.alerts_config),
                            hint="give a readable Apprise YAML or text configuration")
    found = apprise.Apprise()
    found.add(config)
    return found


def destinations(settings: Settings) -> list[Destination]:
    """Every destination the settings route a severity to; empty when none is configured.

    With ``alerts_config`` set, a severity whose setting is empty goes to the services
    tagged with its name in lower case (``critical``, ``high``, ``warning``), if any.
    Raises SettingsError naming the severity setting for a URL Apprise cannot use or a tag
    no service in ``alerts_config`` carries.
    """
    config = _config_services(settings)
    services: dict[str, tuple[Any, set[str]]] = {}
    for severity in ROUTED_SEVERITIES:
        name = severity_setting(severity)
        entries: tuple[str, ...] = getattr(settings, name)
        chosen: list[Any] = []
        if not entries and config is not None:
            chosen += config.find(severity.lower(), match_always=False)
        for entry in entries:
            chosen += _services_for(entry, name, config)
        for service in chosen:
            services.setdefault(service.url(), (service, set()))[1].add(severity)
    return [Destination(hashlib.sha256(url.encode()).hexdigest()[:16],
                        str(service.url(privacy=True)), service, frozenset(sevs))
            for url, (service, sevs) in services.items()]


def _services_for(entry: str, name: str, config: apprise.Apprise | None) -> list[Any]:
    """The services an entry of setting ``name`` stands for: a URL's, or a tag's."""
    if "://" in entry:
        service = apprise.Apprise.instantiate(entry)
        if service is None:
            raise SettingsError("not an Apprise URL Apprise can use", field=name,
                                value=entry.split("://", 1)[0] + "://...",
                                hint="see https://appriseit.com for URL forms")
        return [service]
    found = list(config.find(entry, match_always=False)) if config is not None else []
    if not found:
        raise SettingsError("no service in alerts_config has this tag", field=name,
                            value=entry, hint="tag a service in the Apprise configuration "
                                              "file, or give an Apprise URL")
    return found


def routes(dests: list[Destination]) -> list[Route]:
    """The outbox routes: one per (severity, destination)."""
    return [Route(severity, d.key, severity in DIGEST_SEVERITIES)
            for d in dests for severity in sorted(d.severities)]


def configured(settings: Settings) -> bool:
    """Whether any destination is configured (without building them)."""
    return settings.alerts_config is not None or any(
        getattr(settings, severity_setting(s)) for s in ROUTED_SEVERITIES)

