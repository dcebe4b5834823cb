"""The API as users run it: `branchguard serve` and `branchguard run` (which starts it as a
child), health and readiness with real NATS, /metrics, and the API benchmark's smoke run."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from appliance.casework import keys
from appliance.change import connect_writer
from appliance.store import Store
from tests.api_support import ServeProcess, api_settings, fill
from tests.support import make_transactions, query, send, stored_count, wait_until
from tests.test_monitoring import used_metrics
from tests.test_nats_security import _certificate

Node = type


def test_run_starts_the_api_and_stops_it(tmp_path: Path, nats_url: str,
                                         node_factory: Node) -> None:
    data = tmp_path / "node"
    # fixed thresholds: the cached list below must gain alerts with each commit, which a
    # new node's cold alert budget would not give it
    node = node_factory(data, nats_url, {"BRANCHGUARD_RUN_API": "true",
                                         "BRANCHGUARD_API_PORT": "0",
                                         "BRANCHGUARD_ALERT_BUDGET": "false"}).start()
    wait_until(lambda: '"api.listening"' in node.log(), message="api listening")
    url = "http://127.0.0.1:" + re.search(r'"api.listening".*?"port":(\d+)',
                                          node.log()).group(1)
    assert send(nats_url, [i.tx for i in make_transactions(120, seed=4)]) == 120
    wait_until(lambda: stored_count(data / "branchguard.db") == 120, message="stored")
    writer = connect_writer(data / "branchguard.db")
    _, key = keys.create(writer, "ops", "viewer", "test")
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        # the node's health file says the API child is up within a second of it serving
        wait_until(lambda: http.get("/readyz").status_code == 200, timeout=15,
                   message="ready")
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "nats": "ok", "model": "ok",
                                          "scorer": "ok", "api": "ok", "litestream": "ok"}
        assert ready.json()["consumer_lag"] == 0
        h = {"Authorization": f"Bearer {key}"}
        for _ in range(3):
            assert http.get("/api/v1/alerts", headers=h).status_code == 200
        assert http.get("/api/v1/alerts", headers={"Authorization": "Bearer x"}
                        ).status_code == 401
        metrics = http.get("/metrics").text
        # the real scorer's commits, from another process, invalidate the cached list
        db = data / "branchguard.db"
        stored = 120
        for seed in (5, 6, 7):
            assert http.get("/api/v1/alerts", headers=h).headers["x-cache"] == "hit"
            stored += send(nats_url, [i.tx for i in make_transactions(40, seed=seed)])
            wait_until(lambda: stored_count(db) == stored, message="stored")
            fresh = http.get("/api/v1/alerts", headers=h)
            assert fresh.headers["x-cache"] == "miss"
            assert fresh.json()["total"] == query(db, "SELECT count(*) FROM alerts")[0][0]
            assert fresh.json()["alerts"][0]["alert_id"] == query(
                db, "SELECT max(alert_id) FROM alerts")[0][0]
            assert http.get("/api/v1/alerts", headers=h).headers["x-cache"] == "hit"
    assert "branchguard_transactions_total 120.0" in metrics
    assert re.search(r'branchguard_alerts_total\{severity="\w+"\} \d', metrics)
    assert re.search(r'branchguard_alert_cases\{severity="\w+",status="NEW"\} \d', metrics)
    assert "branchguard_dead_letters_total 0.0" in metrics
    assert 'branchguard_model_info{configured="if-v1",last_model="if-v1"' in metrics
    assert 'branchguard_checkpoint_stream_seq{consumer="scorer"} 120.0' in metrics
    assert "branchguard_consumer_pending_messages 0.0" in metrics
    def value(name: str) -> float:
        return float(re.search(rf"^{name} (\S+)$", metrics, re.M).group(1))

    # no destinations here: the alerts are stored and owed to nobody, so no queue and no age
    # (the undelivered-notifications rule must not fire on a node that sends no alerts)
    assert query(db, "SELECT count(*) FROM alert_outbox")[0][0] > 0
    assert value("branchguard_alerts_oldest_undelivered_seconds") == 0
    assert value("branchguard_alerts_queue_depth") == 0
    assert value("branchguard_replication_lag_seconds") >= 0  # the default file:// replica
    assert 0 < value("branchguard_data_dir_free_bytes") <= value(
        "branchguard_data_dir_size_bytes")
    # The contract with monitoring/: every metric a rule or the dashboard reads is exposed by
    # the real server (drift only once `drift run` has stored a report: its family is here).
    exposed = set(re.findall(r"^# TYPE (branchguard_[a-z0-9_]+)", metrics, re.M))
    exposed |= {n + "_total" for n in exposed}
    missing = used_metrics() - exposed
    assert not missing, f"rules or dashboard read metrics /metrics lacks: {missing}"
    assert 'branchguard_api_cache_hits_total{route="/api/v1/alerts"} 2.0' in metrics
    assert 'branchguard_api_cache_misses_total{route="/api/v1/alerts"} 1.0' in metrics
    assert ('branchguard_api_requests_total{method="GET",route="/api/v1/alerts",'
            'status="200"} 3.0') in metrics
    assert 'status="401"} 1.0' in metrics
    buckets = re.findall(r'branchguard_api_request_seconds_bucket\{(?=[^}]*route="/api/v1/'
                         r'alerts")[^}]*le="([^"]+)"', metrics)
    assert {"0.0001", "0.0005", "2.5", "10.0", "+Inf"} <= set(buckets), buckets
    assert node.stop() == 0
    assert_gone(url, "the API outlived branchguard run")


def assert_gone(url: str, message: str, timeout: float = 15.0) -> None:
    """The server at ``url`` stops answering within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/healthz", timeout=1)
        except httpx.TransportError:
            return
        time.sleep(0.1)
    raise AssertionError(message)


def test_the_api_dies_with_a_killed_node(tmp_path: Path, nats_url: str,
                                         node_factory: Node) -> None:
    node = node_factory(tmp_path / "node", nats_url, {"BRANCHGUARD_RUN_API": "true",
                                                      "BRANCHGUARD_API_PORT": "0"}).start()
    wait_until(lambda: '"api.listening"' in node.log(), message="api listening")
    url = "http://127.0.0.1:" + re.search(r'"api.listening".*?"port":(\d+)',
                                          node.log()).group(1)
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200
    node.kill()  # SIGKILL: the node gets no chance to stop its children
    assert_gone(url, "the API outlived the killed node")


def test_readyz_says_what_failed_and_nothing_more(tmp_path: Path) -> None:
    settings = api_settings(tmp_path)  # NATS at 127.0.0.1:1: nothing listens there
    Store.open(settings.db_path).close()
    server = ServeProcess.start(settings, {"BRANCHGUARD_MODEL_VERSION": "no-such-model"})
    try:
        r = httpx.get(server.url + "/readyz", timeout=10)
        assert r.status_code == 503
        assert r.json() == {"ready": False, "consumer_lag": None,
                            "checks": {"database": "ok", "nats": "failed", "model": "failed",
                                       "scorer": "not running"}}
        assert httpx.get(server.url + "/healthz").status_code == 200
        missing = httpx.get(server.url + "/api/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["status"] == 404
    finally:
        assert server.stop() == 0


def test_with_a_certificate_it_serves_https_only(tmp_path: Path) -> None:
    settings = api_settings(tmp_path)
    Store.open(settings.db_path).close()
    (tmp_path / "tls").mkdir()
    cert, key = _certificate(tmp_path / "tls")
    server = ServeProcess.start(settings, {"BRANCHGUARD_API_TLS_CERT": str(cert),
                                           "BRANCHGUARD_API_TLS_KEY": str(key),
                                           "BRANCHGUARD_CONSOLE_ENABLED": "false"})
    try:
        assert '"url":"https://127.0.0.1:' in server.log_path.read_text()
        https = server.url.replace("http://", "https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        r = httpx.get(https + "/healthz", verify=trusted, timeout=10)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        with pytest.raises(httpx.TransportError):  # no plain-HTTP answer at all
            httpx.get(server.url + "/healthz", timeout=5)
        with pytest.raises(httpx.TransportError):  # and no HTTPS with an unknown certificate
            httpx.get(https + "/healthz", timeout=5)
    finally:
        assert server.stop() == 0
    half = subprocess.run([sys.executable, "-m", "appliance", "serve", "--data-dir",
                           str(tmp_path), "--port", "0"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "BRANCHGUARD_API_TLS_CERT": str(cert)})
    assert half.returncode == 2 and "api_tls_key" in half.stderr


@pytest.mark.parametrize(("allowed", "second_address"), [
    (None, [429]),  # the default believes no proxy: the header is ignored, one address
    ("10.255.0.1", [429]),  # another proxy listed: loopback's header is not believed
    ("127.0.0.1", [401]),  # a proxy on this host listed: each client its own budget
])
def test_limits_count_by_the_address_a_believed_proxy_forwards(
        tmp_path: Path, allowed: str | None, second_address: list[int]) -> None:
    settings = api_settings(tmp_path)
    Store.open(settings.db_path).close()
    key = keys.create(connect_writer(settings.db_path), "k", "viewer", "test")[1]
    env = {"BRANCHGUARD_API_VERIFICATIONS_PER_MINUTE": "3",
           "BRANCHGUARD_CONSOLE_ENABLED": "false"}
    if allowed is not None:
        env["BRANCHGUARD_API_FORWARDED_ALLOW_IPS"] = allowed
    server = ServeProcess.start(settings, env)

    def codes(client: str, count: int) -> list[int]:
        return [httpx.get(server.url + "/api/v1/alerts", timeout=10, headers={
            "Authorization": f"Bearer {key[:-3]}{n:03d}", "X-Forwarded-For": client}
        ).status_code for n in range(count)]
    try:
        assert codes("10.0.0.1", 4) == [401, 401, 401, 429]
        assert codes("10.0.0.2", 1) == second_address
    finally:
        assert server.stop() == 0


def test_a_rotating_forwarded_for_does_not_dodge_the_limits(tmp_path: Path) -> None:
    """The issue's attack, on the default settings: a new X-Forwarded-For on every wrong
    key, from loopback (the key ids are made up, so only the address's limit applies)."""
    settings = api_settings(tmp_path)
    Store.open(settings.db_path).close()
    server = ServeProcess.start(settings, {"BRANCHGUARD_API_VERIFICATIONS_PER_MINUTE": "5",
                                           "BRANCHGUARD_CONSOLE_ENABLED": "false"})
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            codes = [client.get("/api/v1/alerts", headers={
                "Authorization": f"Bearer bg_{n:012x}_{'x' * 43}",
                "X-Forwarded-For": f"10.{n // 250}.{n % 250}.1"}).status_code
                for n in range(20)]
    finally:
        assert server.stop() == 0
    assert codes == [401] * 5 + [429] * 15


def test_serve_refuses_bad_settings_with_the_field(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "appliance", "serve", "--data-dir",
                             str(tmp_path), "--port", "70000"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "api_port" in result.stderr


def test_bench_api_smoke(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "bench", "api", "--transactions", "2000",
         "--alerts", "150", "--requests", "60", "--concurrency", "1,4", "--data-dir",
         str(tmp_path / "bench"), "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["database"]["transactions"] == 2000
    assert report["database"]["alerts"] == 150
    assert [(p["mode"], p["concurrency"]) for p in report["phases"]] == [
        ("cached", 1), ("uncached", 1), ("cached", 4), ("uncached", 4)]
    for phase in report["phases"]:
        assert phase["statuses"] == {"200": 60}
        lat = phase["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    # reusing the directory keeps the database
    store = Store.open(tmp_path / "bench" / "branchguard.db")
    try:
        assert store.counts()["transactions"] == 2000
    finally:
        store.close()


def test_bench_api_beside_a_wrong_secret_flood_smoke(tmp_path: Path) -> None:
    """The flood's figures are there, it is answered 401 then 429 (never anything that
    passes, never a 5xx), and the valid requests beside it all succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "bench", "api", "--transactions", "2000",
         "--alerts", "150", "--requests", "200", "--concurrency", "1",
         "--wrong-secret-flood", "4", "--data-dir", str(tmp_path / "bench"), "--json"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    phases = json.loads(result.stdout)["phases"]
    assert [(p["mode"], p["flood"] is not None) for p in phases] == [
        ("cached", False), ("cached", True), ("uncached", False), ("uncached", True)]
    for phase in phases:
        assert phase["statuses"] == {"200": 200}
        flood = phase["flood"]
        if flood is not None:
            assert flood["clients"] == 4 and flood["requests"] > 0
            assert set(flood["statuses"]) <= {"401", "429"}, flood
            assert flood["statuses"]["429"] > 0
            assert int(flood["statuses"].get("401", 0)) <= 10  # api_key_attempts_per_minute


def test_fill_helper_makes_alerts_for_the_api_tests(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "x.db")
    try:
        fill(store, 50)
        assert 0 < store.counts()["alerts"] < 50
    finally:
        store.close()
