"""The dispatcher delivering for real: Apprise to a local HTTP receiver (json://, form://) and
a local SMTP server (mailto://), the dispatcher a real child process killed with SIGKILL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import cli
from appliance.alerts.metrics import figures, health, status
from appliance.alerts.outbox import Outbox
from appliance.settings import Settings, load

from .alerting import Dispatcher, Spec, store_alerts, unrouted
from .receivers import HttpReceiver, SmtpReceiver, free_port, wait_for
from .support import query


@pytest.fixture
def http() -> Iterator[HttpReceiver]:
    receiver = HttpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpReceiver]:
    receiver = SmtpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def dispatchers(request: pytest.FixtureRequest) -> Iterator[list[Dispatcher]]:
    started: list[Dispatcher] = []
    yield started
    for d in started:
        d.kill()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for d in started:
            print(f"--- dispatcher log {d.log_path}\n{d.log()[-5000:]}")


def start(dispatchers: list[Dispatcher], data_dir: Path, **env: str) -> Dispatcher:
    d = Dispatcher(data_dir, {f"BRANCHGUARD_{k.upper()}": v for k, v in env.items()})
    dispatchers.append(d)
    return d.start()


def states(db: Path) -> dict[str, int]:
    return dict(query(db, "SELECT state, count(*) FROM alert_deliveries GROUP BY state"))


def test_routes_by_severity_to_json_form_and_email(tmp_path: Path, http: HttpReceiver,
                                                   smtp: SmtpReceiver,
                                                   dispatchers: list[Dispatcher]) -> None:
    db = tmp_path / "branchguard.db"
    store_alerts(db, [Spec("c1", "CRITICAL", "A-1", "T1", 9000.0),
                      Spec("c2", "CRITICAL", "A-2", "T2", 9100.0),
                      Spec("h1", "HIGH", "A-3", "T3"),
                      Spec("w1", "WARNING", "A-4", "T4"), Spec("w2", "WARNING", "A-5", "T5"),
                      Spec("i1", "INFO", "A-6", "T6")])  # INFO: approve, no alert at all
    start(dispatchers, tmp_path, alerts_critical=f"json://{http.base}/critical,{smtp.url()}",
          alerts_high=f"form://{http.base}/high",
          alerts_warning=f"json://{http.base}/digest",
          alerts_group_wait_seconds="0", alerts_digest_interval_seconds="1")
    wait_for(lambda: len(http.received) == 4 and len(smtp.received) == 2,
             message="2 critical + 1 high + 1 digest over HTTP, 2 critical by mail")
    time.sleep(1.5)  # nothing more arrives (another digest interval has passed)
    assert len(http.received) == 4 and len(smtp.received) == 2

    critical = sorted(r.title for r in http.at("/critical"))
    assert critical[0].startswith("[CRITICAL] 9,000.00 EUR · account A-1 · terminal T1 · "
                                  "branch BR001")
    assert critical[1].startswith("[CRITICAL] 9,100.00 EUR · account A-2 · terminal T2")
    assert sorted(subject for _, subject, _ in smtp.received) == critical
    assert all(to == ["fraud@bank.example"] for to, _, _ in smtp.received)
    (high,) = http.at("/high")
    assert high.title.startswith("[HIGH] 120.00 EUR · account A-3 · terminal T3")
    assert "Far above what this account usually spends: amount 400.00 is 17.0x" in high.body
    (digest,) = http.at("/digest")
    assert digest.title == "[WARNING] digest: 2 alerts · branch BR001"
    assert "Risky merchant category away from the account's usual places: 2" in digest.body
    ids = dict(query(db, "SELECT transaction_id, alert_id FROM alerts"))
    assert f"http://127.0.0.1:8080/console/alerts/{ids['h1']}" in high.body
    assert f"/console/alerts/{ids['w1']}" in digest.body and "i1" not in ids
    assert states(tmp_path / "branchguard.db") == {"sent": 7}


def test_account_ids_are_masked_everywhere(tmp_path: Path, http: HttpReceiver,
                                           dispatchers: list[Dispatcher]) -> None:
    card = "4111111111111111"
    store_alerts(tmp_path / "branchguard.db", [Spec("c1", "CRITICAL", card, "T1"),
                                               Spec("c2", "CRITICAL", card, "T2")])
    start(dispatchers, tmp_path, alerts_critical=f"json://{http.base}/c",
          alerts_group_wait_seconds="0.5", console_url="https://console.branch.example")
    wait_for(lambda: len(http.received) == 1, message="one grouped message for the account")
    (message,) = http.received
    assert message.title.startswith("[CRITICAL] 2 alerts on account ****1111 · branch BR001")
    assert card not in message.title + message.body
    assert "https://console.branch.example/console/alerts/" in message.body


def test_a_receiver_failing_at_first_gets_the_alert_once_after_retries(
        tmp_path: Path, http: HttpReceiver, dispatchers: list[Dispatcher]) -> None:
    http.fail_first["/flaky"] = 3
    store_alerts(tmp_path / "branchguard.db", [Spec("c1", "CRITICAL")])
    start(dispatchers, tmp_path, alerts_critical=f"json://{http.base}/flaky",
          alerts_group_wait_seconds="0", alerts_retry_initial_seconds="0.1",
          alerts_retry_max_seconds="0.4")
    wait_for(lambda: len(http.received) == 1, message="delivered after retries")
    time.sleep(1.0)
    assert len(http.received) == 1 and http.attempts["/flaky"] == 4
    assert states(tmp_path / "branchguard.db") == {"sent": 1}
    status = CliRunner().invoke(cli.cli, ["alerts", "status", "--data-dir", str(tmp_path)])
    assert '"branchguard_alerts_retried": 3' in status.output
    assert '"branchguard_alerts_sent": 1' in status.output
    assert '"health": []' in status.output


def test_past_max_age_an_alert_is_failed_listed_and_a_health_warning(
        tmp_path: Path, dispatchers: list[Dispatcher]) -> None:
    dead = f"json://127.0.0.1:{free_port()}/nobody"
    store_alerts(tmp_path / "branchguard.db", [Spec("c1", "CRITICAL")])
    start(dispatchers, tmp_path, alerts_critical=dead, alerts_group_wait_seconds="0",
          alerts_retry_initial_seconds="0.2", alerts_retry_max_seconds="0.2",
          alerts_max_age_seconds="1.5")
    wait_for(lambda: states(tmp_path / "branchguard.db").get("failed") == 1, timeout=20,
             message="marked failed")
    runner = CliRunner()
    failed = runner.invoke(cli.cli, ["alerts", "failed", "--data-dir", str(tmp_path)]).output
    assert '"severity": "CRITICAL"' in failed and "json://127.0.0.1" in failed
    assert '"attempts": ' in failed and "/console/alerts/1" in failed
    status = runner.invoke(cli.cli, ["alerts", "status", "--data-dir", str(tmp_path)]).output
    assert '"branchguard_alerts_failed": 1' in status
    assert "1 alert deliveries failed" in status


def test_kill_after_the_receiver_accepted_sends_at_most_one_duplicate(
        tmp_path: Path, dispatchers: list[Dispatcher]) -> None:
    gate = threading.Event()
    held = HttpReceiver(hold=gate).start()
    try:
        store_alerts(tmp_path / "branchguard.db",
                     [Spec("c1", "CRITICAL", "A-1", "T1"), Spec("c2", "HIGH", "A-2", "T2")])
        env = dict(alerts_critical=f"json://{held.base}/h", alerts_high=f"json://{held.base}/h",
                   alerts_group_wait_seconds="0")
        first = start(dispatchers, tmp_path, **env)
        wait_for(lambda: len(held.received) == 1, message="first message accepted")
        first.kill()  # the receiver has it; the dispatcher never heard back
        assert states(tmp_path / "branchguard.db") == {"pending": 2}
        held.hold = None
        gate.set()  # the killed dispatcher's request is answered into the void
        start(dispatchers, tmp_path, **env)
        wait_for(lambda: states(tmp_path / "branchguard.db") == {"sent": 2},
                 message="both delivered after the restart")
        titles = [r.title for r in held.received]
        assert len(titles) == 3  # c1 (twice: the one duplicate) and c2, nothing lost
        assert titles[0] in titles[1:] and sorted(set(titles)) == sorted(titles[1:])
    finally:
        held.stop()


def test_kill_before_sending_delivers_after_restart(tmp_path: Path, http: HttpReceiver,
                                                    dispatchers: list[Dispatcher]) -> None:
    db = tmp_path / "branchguard.db"
    store_alerts(db, [Spec("c1", "CRITICAL", "A-1", "T1"), Spec("c2", "HIGH", "A-2", "T2")])
    url = f"json://{http.base}/k"
    first = start(dispatchers, tmp_path, alerts_critical=url, alerts_high=url,
                  alerts_group_wait_seconds="300")
    wait_for(lambda: states(db) == {"pending": 2}, message="routed, waiting for the burst")
    first.kill()
    store_alerts(db, [Spec("c3", "CRITICAL", "A-3", "T3")], first_seq=10)  # not yet routed
    start(dispatchers, tmp_path, alerts_critical=url, alerts_high=url,
          alerts_group_wait_seconds="0")
    wait_for(lambda: len(http.received) == 3, message="all three delivered")
    time.sleep(0.5)
    assert len(http.received) == 3 and states(db) == {"sent": 3}
    assert unrouted(db) == 0


def test_two_hundred_alerts_on_one_terminal_are_one_message(
        tmp_path: Path, http: HttpReceiver, dispatchers: list[Dispatcher]) -> None:
    store_alerts(tmp_path / "branchguard.db",
                 [Spec(f"t{i}", "CRITICAL" if i % 4 == 0 else "HIGH", f"A-{i}", "T0666",
                       amount=50.0) for i in range(200)])
    start(dispatchers, tmp_path, alerts_critical=f"json://{http.base}/burst",
          alerts_high=f"json://{http.base}/burst", alerts_group_wait_seconds="1")
    wait_for(lambda: states(tmp_path / "branchguard.db") == {"sent": 200},
             message="all 200 delivered")
    time.sleep(0.5)
    (message,) = http.received
    assert message.title == ("[CRITICAL] 200 alerts on terminal T0666 · branch BR001 · "
                             "10,000.00 EUR")
    assert "50 CRITICAL, 150 HIGH" in message.body and "... and 190 more" in message.body


def test_more_alerts_on_a_terminal_within_the_interval_wait_and_go_together(
        tmp_path: Path, http: HttpReceiver, dispatchers: list[Dispatcher]) -> None:
    db = tmp_path / "branchguard.db"
    store_alerts(db, [Spec("a", "CRITICAL", "A-1", "T1")])
    start(dispatchers, tmp_path, alerts_critical=f"json://{http.base}/t",
          alerts_group_wait_seconds="0", alerts_group_interval_seconds="2")
    wait_for(lambda: len(http.received) == 1, message="first alert")
    store_alerts(db, [Spec(f"b{i}", "CRITICAL", f"A-{i + 2}", "T1") for i in range(5)],
                 first_seq=10)
    time.sleep(1.0)
    assert len(http.received) == 1  # held for the rest of the interval
    wait_for(lambda: len(http.received) == 2, message="the follow-up")
    assert http.received[1].title.startswith("[CRITICAL] 5 alerts on terminal T1")


def test_rate_limit_per_destination(tmp_path: Path, http: HttpReceiver,
                                    dispatchers: list[Dispatcher]) -> None:
    db = tmp_path / "branchguard.db"
    start(dispatchers, tmp_path, alerts_critical=f"json://{http.base}/a",
          alerts_group_wait_seconds="0", alerts_rate_per_minute="2")
    for i in range(2):
        store_alerts(db, [Spec(f"r{i}", "CRITICAL", f"A-{i}", f"T{i}")], first_seq=i + 1)
        wait_for(lambda: len(http.received) == i + 1, message=f"message {i + 1}")
    store_alerts(db, [Spec(f"s{i}", "CRITICAL", f"B-{i}", f"U{i}") for i in range(3)],
                 first_seq=10)
    time.sleep(1.5)
    assert len(http.received) == 2  # the minute's two messages are used up
    assert states(db) == {"sent": 2, "pending": 3}


def test_more_ready_bursts_than_the_rate_allows_go_as_one_message(
        tmp_path: Path, http: HttpReceiver, dispatchers: list[Dispatcher]) -> None:
    store_alerts(tmp_path / "branchguard.db",
                 [Spec(f"r{i}", "CRITICAL", f"A-{i}", f"T{i}") for i in range(5)])
    start(dispatchers, tmp_path, alerts_critical=f"json://{http.base}/a",
          alerts_group_wait_seconds="0", alerts_rate_per_minute="3")
    wait_for(lambda: states(tmp_path / "branchguard.db") == {"sent": 5}, message="sent")
    (message,) = http.received
    assert message.title.startswith("[CRITICAL] 5 alerts on 5 terminals, 5 accounts")


def test_no_destinations_routes_nowhere_and_says_so_once(
        tmp_path: Path, dispatchers: list[Dispatcher]) -> None:
    db = tmp_path / "branchguard.db"
    store_alerts(db, [Spec("c1", "CRITICAL")])
    d = start(dispatchers, tmp_path)
    wait_for(lambda: unrouted(db) == 0, message="routed")
    store_alerts(db, [Spec("c2", "CRITICAL")], first_seq=5)
    wait_for(lambda: unrouted(db) == 0, message="routed again")
    assert d.stop() == 0
    assert d.log().count('"alerts.no_destinations"') == 1
    assert states(db) == {}


def test_alerts_test_reports_each_destination(tmp_path: Path, http: HttpReceiver,
                                              smtp: SmtpReceiver,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"json://127.0.0.1:{free_port()}/gone"
    monkeypatch.setenv("BRANCHGUARD_ALERTS_CRITICAL", f"json://{http.base}/ok,{smtp.url()}")
    monkeypatch.setenv("BRANCHGUARD_ALERTS_HIGH", dead)
    result = CliRunner().invoke(cli.cli, ["alerts", "test", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert sum(line.startswith("ok     json://") for line in lines) == 1
    assert sum(line.startswith("ok     mailto://") for line in lines) == 1
    assert sum(line.startswith("FAILED json://127.0.0.1") for line in lines) == 1
    assert http.received[0].title == "[TEST] Branchguard alert test · branch BR001"
    assert smtp.received[0][1] == "[TEST] Branchguard alert test · branch BR001"


def test_a_bad_url_is_refused_naming_the_setting(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(cli.cli, ["alerts", "test", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no alert destinations configured" in result.output
    monkeypatch.setenv("BRANCHGUARD_ALERTS_HIGH", "nosuchservice://x")
    result = CliRunner().invoke(cli.cli, ["alerts", "test", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "alerts_high: not an Apprise URL" in result.output
    monkeypatch.setenv("BRANCHGUARD_ALERTS_HIGH", "oncall")
    result = CliRunner().invoke(cli.cli, ["alerts", "test", "--data-dir", str(tmp_path)])
    assert "alerts_high: no service in alerts_config has this tag" in result.output


def test_tags_from_an_apprise_yaml_config(tmp_path: Path, http: HttpReceiver,
                                          dispatchers: list[Dispatcher]) -> None:
    config = tmp_path / "apprise.yml"
    config.write_text("version: 1\nurls:\n"
                      f"  - json://{http.base}/oncall:\n      - tag: oncall\n"
                      f"  - json://{http.base}/team:\n      - tag: team\n")
    store_alerts(tmp_path / "branchguard.db", [Spec("c1", "CRITICAL", "A-1", "T1"),
                                               Spec("h1", "HIGH", "A-2", "T2")])
    start(dispatchers, tmp_path, alerts_config=str(config), alerts_critical="oncall,team",
          alerts_high="team", alerts_group_wait_seconds="0")
    wait_for(lambda: len(http.received) == 3, message="three messages")
    assert [r.title[:10] for r in http.at("/oncall")] == ["[CRITICAL]"]
    assert sorted(r.title.split("]")[0] for r in http.at("/team")) == ["[CRITICAL", "[HIGH"]


def test_with_an_apprise_config_severities_default_to_their_own_tags(
        tmp_path: Path, http: HttpReceiver, dispatchers: list[Dispatcher]) -> None:
    config = tmp_path / "apprise.yml"
    config.write_text("version: 1\nurls:\n"
                      f"  - json://{http.base}/pager:\n      - tag: critical\n"
                      f"  - json://{http.base}/desk:\n      - tag: high, warning\n")
    store_alerts(tmp_path / "branchguard.db", [Spec("c1", "CRITICAL", "A-1", "T1"),
                                               Spec("h1", "HIGH", "A-2", "T2"),
                                               Spec("w1", "WARNING", "A-3", "T3")])
    start(dispatchers, tmp_path, alerts_config=str(config), alerts_group_wait_seconds="0",
          alerts_digest_interval_seconds="1")
    wait_for(lambda: len(http.received) == 3, message="three messages")
    assert [r.title[:10] for r in http.at("/pager")] == ["[CRITICAL]"]
    assert sorted(r.title.split("]")[0] for r in http.at("/desk")) == ["[HIGH", "[WARNING"]


def test_outbox_counts_read_while_nothing_is_configured(tmp_path: Path) -> None:
    db = tmp_path / "branchguard.db"
    store_alerts(db, [Spec("c1", "CRITICAL"), Spec("w1", "WARNING", "A-2", "T2")])
    outbox = Outbox(db)
    try:
        counts = outbox.counts()
    finally:
        outbox.close()
    assert (counts.unrouted, counts.pending, counts.sent, counts.failed) == (2, 0, 0, 0)
    assert counts.oldest_undelivered() is not None  # owed, once a destination is configured
    later = counts.oldest_unrouted_at + 3600  # type: ignore[operator]
    owed = figures(counts, later)
    assert owed["branchguard_alerts_queue_depth"] == 2
    assert owed["branchguard_alerts_oldest_undelivered_seconds"] >= 3600
    assert health(counts, 600, later)
    # with no destination configured nothing routes them: no queue, no age, no warning, so
    # the undelivered-notifications rule does not fire on a node that sends no alerts
    nowhere = figures(counts, later, routing=False)
    assert nowhere["branchguard_alerts_queue_depth"] == 0
    assert nowhere["branchguard_alerts_oldest_undelivered_seconds"] == 0
    assert health(counts, 600, later, routing=False) == []
    assert status(load(None, env={}, data_dir=tmp_path))["metrics"][
        "branchguard_alerts_queue_depth"] == 0


def test_deliveries_to_a_destination_no_longer_configured_are_owed_to_nobody(
        tmp_path: Path) -> None:
    """Alerts routed while a destination was configured, which was then removed: nothing
    will ever deliver them, so on a node with no destination (or only another one) they
    are no queue, no age and no warning, and NotificationsUndelivered stays quiet."""
    from starlette.testclient import TestClient

    from appliance.alerts.outbox import Route
    from appliance.alerts.routing import destinations
    from appliance.api.app import create_app

    def node(*urls: str) -> Settings:
        return load(None, env={}, data_dir=tmp_path, nats_url="nats://127.0.0.1:1",
                    alerts_critical=urls, alerts_high=urls)

    db = tmp_path / "branchguard.db"
    store_alerts(db, [Spec("c1", "CRITICAL"), Spec("h1", "HIGH", "A-2", "T2")])
    gone = destinations(node("json://127.0.0.1:9/gone"))[0].key
    outbox = Outbox(db)
    try:
        outbox.route([Route(s, gone, False) for s in ("CRITICAL", "HIGH")], 60)
    finally:
        outbox.close()
    assert states(db) == {"pending": 2} and unrouted(db) == 0
    time.sleep(1.1)  # so that an age counted shows as one

    owed = status(node("json://127.0.0.1:9/gone"))["metrics"]  # still configured: owed
    assert owed["branchguard_alerts_queue_depth"] == 2
    assert owed["branchguard_alerts_oldest_undelivered_seconds"] >= 1
    for settings in (node(), node("json://127.0.0.1:9/elsewhere")):
        shown = status(settings)
        assert shown["metrics"]["branchguard_alerts_queue_depth"] == 0, shown
        assert shown["metrics"]["branchguard_alerts_oldest_undelivered_seconds"] == 0, shown
        assert shown["health"] == []
        with TestClient(create_app(settings)) as api:
            text = api.get("/metrics").text
        assert "\nbranchguard_alerts_oldest_undelivered_seconds 0.0\n" in text, text
        assert "\nbranchguard_alerts_queue_depth 0.0\n" in text
