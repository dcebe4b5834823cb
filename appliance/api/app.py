"""The app factory and ``branchguard serve``.

:func:`create_app` builds the Starlette app from each resource's routes; :func:`serve` runs
it under uvicorn on ``api_host:api_port``. The API opens the node database read-only for
reads and writes only through change.py, so the scorer stays its main writer.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.schemas import SchemaGenerator
from starlette.types import ASGIApp

from .. import logs
from ..store import open_db
from ..settings import Settings
from . import alerts, audit, branches, deadletters, health, keys, lists, stats
from ..casework.dispositions import CODES, FRAUD_TYPES
from .body_limit import BodyLimit
from .head_limit import HeadLimitedProtocol
from .endpoint import Api, Spec, starlette_route
from .errors import error_response, json_response

log = logs.get("appliance.api")
RESOURCES = (alerts.routes, stats.routes, lists.routes, audit.routes, keys.routes,
             deadletters.routes, health.routes, branches.routes)
OPENAPI_PATH = "/api/v1/openapi.json"

BASE_SCHEMA: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Branchguard analyst API", "version": "1"},
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Status": {"type": "string", "enum": ["NEW", "INVESTIGATING",
                                                          "CONFIRMED_FRAUD",
                                                          "FALSE_POSITIVE"]},
                    "Disposition": {"type": "string", "enum": list(CODES)},
                    "FraudType": {"type": "string", "enum": list(FRAUD_TYPES)}},
        "parameters": {
            "alert_id": {"name": "alert_id", "in": "path", "required": True,
                         "schema": {"type": "integer"}},
            "status": {"name": "status", "in": "query", "schema": {"type": "string"},
                       "description": "comma-separated NEW, INVESTIGATING, CONFIRMED_FRAUD, "
                                      "FALSE_POSITIVE"},
            "severity": {"name": "severity", "in": "query", "schema": {"type": "string"},
                         "description": "comma-separated CRITICAL, HIGH, WARNING, INFO"},
            "since": {"name": "since", "in": "query", "schema": {"type": "string"},
                      "description": "event time >= this (epoch seconds or ISO-8601)"},
            "until": {"name": "until", "in": "query", "schema": {"type": "string"},
                      "description": "event time < this (epoch seconds or ISO-8601)"},
            "limit": {"name": "limit", "in": "query",
                      "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
        },
        "responses": {
            "BadRequest": {"description": "a parameter or body field is wrong; the error "
                                          "names it"},
            "NotFound": {"description": "no such resource"},
        },
    },
}


def specs() -> list[Spec]:
    """Every route the API serves (the OpenAPI test checks each is in the schema)."""
    return [spec for resource in RESOURCES for spec in resource.specs]


def create_app(settings: Settings) -> Starlette:
    """The API app for the node database at ``settings.db_path`` (which must exist)."""
    api = Api(settings)
    generator = SchemaGenerator(BASE_SCHEMA)
    schema: list[Response] = []

    def openapi(request: Request) -> Response:
        if not schema:  # parsing every docstring's YAML takes ~0.1 s: once is enough
            schema.append(json_response(generator.get_schema(routes=app.routes)))
        return schema[0]

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = exc.detail if isinstance(exc, HTTPException) else "internal error"
        headers = dict(exc.headers) if isinstance(exc, HTTPException) and exc.headers else None
        field = {404: "path", 413: "body"}.get(status)
        return error_response(status, str(message), field, headers)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        api.close()

    routes: list[BaseRoute] = [starlette_route(api, spec) for spec in specs()]
    routes.append(Route(OPENAPI_PATH, openapi, include_in_schema=False))
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: http_error},
                    middleware=[Middleware(_Measured, api=api),  # 413s are counted too
                                Middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)])
    app.state.api = api
    return app


class _Measured:
    """Middleware adapter: the metrics middleware of ``api`` around the app."""

    def __init__(self, app: ASGIApp, api: Api) -> None:
        self.inner = api.metrics.middleware(app)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.inner(scope, receive, send)


def bind(settings: Settings) -> socket.socket:
    """The listening socket (bound here so port 0 works and the real port can be logged)."""
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((settings.api_host, settings.api_port))
    sock.listen(2048)
    return sock


def serve(settings: Settings, sock: socket.socket | None = None) -> None:
    """Run the API until SIGINT/SIGTERM (uvicorn's graceful shutdown), on ``sock`` when
    given: ``branchguard run`` binds the port itself and hands it to each API child it
    starts, so connections wait in the socket's backlog while a dead child is replaced."""
    open_db(settings.db_path).close()  # create and migrate before opening read-only
    sock = sock if sock is not None else bind(settings)
    host, port = sock.getsockname()[:2]
    app = create_app(settings)
    if settings.console_enabled:  # issue 5: the analyst console under /console
        from ui.mount import mount

        mount(app, settings)
    tls = settings.api_tls_cert is not None
    log.info("api.listening", txn_id=None, host=host, port=port,
             url=f"{'https' if tls else 'http'}://{host}:{port}", db=str(settings.db_path))
    # X-Forwarded-For is believed only from the proxies named in the settings (none by
    # default): uvicorn's own default believes loopback, which would let any local client,
    # or anything relayed through a local process, choose its address for the rate limits.
    proxies = list(settings.api_forwarded_allow_ips)
    config = uvicorn.Config(app, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5,
                            ssl_certfile=settings.api_tls_cert, ssl_keyfile=settings.api_tls_key,
                            proxy_headers=bool(proxies), forwarded_allow_ips=proxies,
                            http=HeadLimitedProtocol, ws_max_size=settings.api_max_body_bytes)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the
    # handler that was there before; make that one a no-op, so a clean stop exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        log.info("api.stopped", txn_id=None)
