"""Routes without a key: ``/healthz`` (the process answers), ``/readyz`` (database, NATS,
model file, and what ``branchguard run`` says of the scorer and each child it supervises;
consumer lag when NATS answers) and ``/metrics``. They are rate-limited by
client address and never show internal error text: a failed check says only ``failed``
(the log has the reason)."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from .. import logs, node_health
from ..settings import nats_servers
from .endpoint import Call, Routes

routes = Routes()
log = logs.get("appliance.api.health")


@routes.route("GET", "/healthz", None)
def healthz(call: Call) -> dict[str, Any]:
    """
    summary: The API process is up.
    security: []
    responses:
      200: {description: '{"status": "ok"}'}
    """
    return {"status": "ok"}


async def _ignore(exc: Exception) -> None:
    """nats-py logs connection errors itself; /readyz reports them instead."""


async def _stream_last_seq(url: str) -> int:
    nc = await nats.connect(nats_servers(url), connect_timeout=1, max_reconnect_attempts=0,
                            allow_reconnect=False, error_cb=_ignore)
    try:
        info = await nc.jetstream().stream_info("TX")
        return int(info.state.last_seq)
    finally:
        await nc.close()


@routes.route("GET", "/readyz", None)
def readyz(call: Call) -> tuple[int, dict[str, Any]]:
    """
    summary: Ready to serve (the database answers, NATS answers, the model file is present,
      the scorer and every child of the node run).
    security: []
    responses:
      200: {description: '{"ready": true, "checks": {...}, "consumer_lag": N}'}
      503: {description: 'not ready; checks name each part that is down and what it is doing'}
    """
    settings = call.api.settings
    checks: dict[str, str] = {}
    checkpoint = 0
    try:
        row = call.conn.execute("SELECT stream_seq FROM checkpoints WHERE consumer = ?",
                                (settings.consumer,)).fetchone()
        checkpoint = int(row[0]) if row else 0
        checks["database"] = "ok"
    except Exception:
        log.warning("readyz.database_failed", exc_info=True, txn_id=None)
        checks["database"] = "failed"
    lag: int | None = None
    try:
        last = asyncio.run(asyncio.wait_for(_stream_last_seq(settings.nats_address), 2.0))
        lag = max(0, last - checkpoint)
        call.api.metrics.consumer_lag.set(lag)
        checks["nats"] = "ok"
    except Exception as exc:
        log.warning("readyz.nats_failed", txn_id=None, error=type(exc).__name__)
        checks["nats"] = "failed"
    model = settings.models_dir / f"{settings.model_version}.onnx"
    checks["model"] = "ok" if model.is_file() else "failed"
    checks.update(node_health.read(settings))  # scorer, nats-server, litestream, alerts
    ready = all(v == "ok" for v in checks.values())
    return (200 if ready else 503), {"ready": ready, "checks": checks, "consumer_lag": lag}


@routes.route("GET", "/metrics", None)
def metrics(call: Call) -> Response:
    """
    summary: Prometheus metrics (text exposition format).
    security: []
    responses:
      200: {description: metrics}
    """
    settings = call.api.settings
    try:
        row = call.conn.execute("SELECT stream_seq FROM checkpoints WHERE consumer = ?",
                                (settings.consumer,)).fetchone()
        last = asyncio.run(asyncio.wait_for(_stream_last_seq(settings.nats_address), 1.0))
        call.api.metrics.consumer_lag.set(max(0, last - (int(row[0]) if row else 0)))
    except Exception as exc:  # the scrape still answers; the gauge keeps its last value
        log.warning("metrics.lag_failed", txn_id=None, error=type(exc).__name__)
    return Response(generate_latest(call.api.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)
