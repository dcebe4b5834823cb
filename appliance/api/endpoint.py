"""How every API request runs: rate limit, authenticate, check the role, serve from the
cache or call the route's function, answer JSON; one read transaction around it all.

The rate limits come first, on the event loop, from memory alone (:func:`admit`): a request
they refuse (a flood, wrong secrets past their limit) costs neither a thread, nor a database
read, nor argon2, nor reading its body, and its 429 is held for
``api_refusal_delay_seconds`` (a timer), which paces each flooding connection to one
request per delay. Everything after runs in the thread pool.

Route functions are plain synchronous functions of a :class:`Call`; they run in Starlette's
thread pool, each thread with its own read-only SQLite connection (WAL readers never block
the scorer, and the scorer never blocks them) and its own writer connection for the small
changes analysts make (see change.py). A route is declared with :meth:`Routes.route`, which
records its method, path, minimum role and whether its responses are cached; its docstring
carries its OpenAPI description.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlite_utils import Database
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import logs
from ..casework.casefile import explainer_for
from ..casework.cases import CaseError
from ..casework.keys import KeyVerifier, Principal, key_id_of
from ..change import apply_change, connect_writer
from ..scoring.lists import ListError
from ..settings import Settings
from . import bodies
from .auth import authenticate, bearer
from .cache import ResponseCache, generation_token
from .errors import ApiError, error_response, from_api_error, json_response
from .metrics import ApiMetrics
from .params import Params
from .ratelimit import RateLimiter

log = logs.get("appliance.api")
T = TypeVar("T")
MAX_ID = 2**62


class Api:
    """What every request shares: settings, connections per thread, key verifier, rate
    limiter, response cache and metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db_path = settings.db_path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.verifier = KeyVerifier(settings.api_key_cache_seconds)
        self.limiter = RateLimiter(settings)
        self.cache = ResponseCache(settings.cache_dir, settings.api_cache_seconds)
        self.metrics = ApiMetrics(self.reader, settings)
        self.explainer = explainer_for(settings)
        """Alerts' explanations, made when read (models read once per process)."""

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (autocommit: each call opens its own read
        transaction)."""
        conn: sqlite3.Connection | None = getattr(self._local, "reader", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 5000")
            self._local.reader = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def writer(self) -> Database:
        db: Database | None = getattr(self._local, "writer", None)
        if db is None:
            db = connect_writer(self.db_path)
            self._local.writer = db
            with self._lock:
                self._connections.append(db.conn)
        return db

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self.cache.close()


@dataclass
class Call:
    """One request as a route function sees it."""

    api: Api
    request: Request
    body: bytes
    principal: Principal | None
    conn: sqlite3.Connection
    allowed: tuple[str, ...]

    def params(self) -> Params:
        return Params(self.request.query_params, self.allowed)

    def path_id(self, name: str) -> int:
        value = int(self.request.path_params[name])
        if not 1 <= value <= MAX_ID:
            raise ApiError(404, "no such id", name)
        return value

    def decode(self, kind: type[T]) -> T:
        return bodies.decode(self.body, kind)

    @property
    def actor(self) -> str:
        return self.principal.actor if self.principal else "anonymous"

    def change(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run one write (see change.py) on this thread's writer connection."""
        return apply_change(self.api.writer(), fn)


Handler = Callable[[Call], Any]


@dataclass(frozen=True)
class Spec:
    method: str
    path: str
    role: str | None
    cached: bool
    params: tuple[str, ...]
    fn: Handler


@dataclass
class Routes:
    """The routes of one resource, declared next to their functions."""

    specs: list[Spec] = field(default_factory=list)

    def route(self, method: str, path: str, role: str | None, params: Iterable[str] = (),
              cached: bool = False) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.specs.append(Spec(method, path, role, cached, tuple(params), fn))
            return fn
        return register


def starlette_route(api: Api, spec: Spec) -> Route:
    """The Starlette route of ``spec``: rate limits and the body on the event loop, then
    everything else in the thread pool."""
    @functools.wraps(spec.fn)
    async def endpoint(request: Request) -> Response:
        try:
            counted = admit(api, spec, request)
        except ApiError as exc:
            if exc.status == 429:  # held, not worked on: see api_refusal_delay_seconds
                await asyncio.sleep(api.settings.api_refusal_delay_seconds)
            return from_api_error(exc)
        body = await request.body() if request.method in ("POST", "PATCH", "PUT") else b""
        return await run_in_threadpool(run, api, spec, request, body, counted)

    endpoint.role = spec.role  # type: ignore[attr-defined]
    return Route(spec.path, endpoint, methods=[spec.method])


def admit(api: Api, spec: Spec, request: Request) -> bool:
    """The rate limits, in the order that keeps both them and authentication cheap to
    attack; raises a 429 (or the 401 of a malformed Authorization header) ApiError.
    Returns whether the request was counted against its key (else it is, once verified).

    Public routes count against the client address. A key that has passed argon2 in this
    process (its sha256 matches: KeyVerifier.known_good) counts against that key only, so
    nobody can spend another key's budget by sending its non-secret id, and a flood on its
    id or from its address does not hold it back. Anything else (no key, a malformed one,
    or one that needs argon2) counts against the client address; one that needs argon2
    also counts a verification against the address and against its key id, before the hash
    check (ratelimit.py).
    """
    address = f"addr:{request.client.host if request.client else 'unknown'}"
    if spec.role is None:
        api.limiter.check(address)
        return False
    try:
        token = bearer(request)
    except ApiError:
        api.limiter.check(address)
        raise
    key_id = None if token is None else key_id_of(token)
    if token is not None and key_id is not None and api.verifier.known_good(token):
        api.limiter.check(f"key:{key_id}")
        return True
    api.limiter.check(address)
    if key_id is not None:
        api.limiter.check_verification(address, key_id)
    return False


def run(api: Api, spec: Spec, request: Request, body: bytes, counted: bool) -> Response:
    conn = api.reader()
    try:
        principal = _authenticate(api, spec, request, conn)
        if principal is not None and not counted:  # its first verification: now it counts
            api.limiter.check(f"key:{principal.key_id}")
        call = Call(api, request, body, principal, conn, spec.params)
        if not spec.cached:
            return _respond(spec.fn(call))
        key = f"{spec.path}?{sorted(request.query_params.multi_items())}|" \
              f"{sorted(request.path_params.items())}|{generation_token(conn)}"
        cached = api.cache.get(key)
        if cached is not None:
            api.metrics.cache_hits.labels(spec.path).inc()
            return Response(cached, media_type="application/json",
                            headers={"X-Cache": "hit"})
        api.metrics.cache_misses.labels(spec.path).inc()
        response = _respond(spec.fn(call))
        if response.status_code == 200:
            api.cache.put(key, bytes(response.body))
        response.headers["X-Cache"] = "miss"
        return response
    except ApiError as exc:
        return from_api_error(exc)
    except (CaseError, ListError) as exc:
        extra = {"current": exc.current} if isinstance(exc, CaseError) and exc.current else None
        return error_response(exc.status, exc.message, exc.field, extra=extra)
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            log.warning("api.database_busy", txn_id=None, path=spec.path)
            return error_response(503, "database busy; retry", None, {"Retry-After": "1"})
        log.error("api.failed", exc_info=True, txn_id=None, path=spec.path)
        return error_response(500, "internal error")
    except Exception:
        log.error("api.failed", exc_info=True, txn_id=None, path=spec.path)
        return error_response(500, "internal error")
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


def _authenticate(api: Api, spec: Spec, request: Request, conn: sqlite3.Connection
                  ) -> Principal | None:
    """Open the request's read transaction; the caller's principal (None on a public
    route). The rate limits have had their say already (:func:`admit`)."""
    conn.execute("BEGIN")
    if spec.role is None:
        return None
    return authenticate(conn, api.verifier, bearer(request), spec.role)


def _respond(result: Any) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, tuple):
        status, content = result
        return json_response(content, status)
    return json_response(result)
