"""Alert content, bursts and pacing: the pure parts of the dispatcher."""

from __future__ import annotations

import random

from appliance.alerts.grouping import Throttle, bursts
from appliance.alerts.messages import AlertView, digest, grouped, mask_account, single
from appliance.alerts.pacing import Backoff, RateLimit

CONSOLE = "https://console.example/"


def view(alert_id: int, account: str = "A-1", terminal: str = "T1", severity: str = "HIGH",
         created: float = 1000.0, amount: float = 10.0) -> AlertView:
    return AlertView(alert_id, severity, 0.85, created, 1_780_000_000.0, account, terminal,
                     "BR001", amount, "EUR", ["high_value", "rule_from_the_future"],
                     ["amount 9000.00 >= 5000.00"], "review", "ATM", "Espoo", None)


def test_account_ids_longer_than_eight_show_only_the_last_four() -> None:
    assert mask_account("4111111111111111") == "****1111"
    assert mask_account("A-12345") == "A-12345"
    assert mask_account("123456789") == "****6789"


def test_single_message_title_body_and_link() -> None:
    m = single(view(7, account="FI2112345600000785"), CONSOLE)
    assert m.title == "[HIGH] 10.00 EUR · account ****0785 · terminal T1 · branch BR001"
    assert "FI2112345600000785" not in m.body
    assert "- High amount: amount 9000.00 >= 5000.00" in m.body
    assert "- Rule from the future" in m.body  # an unknown code still reads as words
    assert m.body.endswith("Case: https://console.example/console/alerts/7")
    assert m.alert_ids == (7,) and m.severity == "HIGH"


def test_grouped_and_digest_count_and_list() -> None:
    alerts = [view(i, account=f"ACCOUNT-{i:06d}", severity="CRITICAL" if i == 3 else "HIGH")
              for i in range(12)]
    m = grouped(alerts, CONSOLE)
    assert m.title == "[CRITICAL] 12 alerts on terminal T1 · branch BR001 · 120.00 EUR"
    assert "1 CRITICAL, 11 HIGH" in m.body and "... and 2 more" in m.body
    assert m.body.count("/console/alerts/") == 10 and m.alert_ids == tuple(range(12))
    assert "ACCOUNT-000001" not in m.body
    d = digest(alerts[:2], CONSOLE)
    assert d.title == "[HIGH] digest: 2 alerts · branch BR001"
    assert "- T1 (branch BR001): 2" in d.body


def test_bursts_join_by_terminal_then_account() -> None:
    alerts = [view(1, "A", "T1"), view(2, "B", "T2"), view(3, "A", "T3"), view(4, "C", "T1"),
              view(5, "D", "T4")]
    groups = [[a.alert_id for a in b.alerts] for b in bursts(alerts)]
    assert groups == [[1, 3, 4], [2], [5]]


def test_throttle_waits_for_the_burst_then_the_interval() -> None:
    throttle = Throttle(group_wait=5.0, group_interval=60.0)
    (first,) = bursts([view(1, created=100.0)])
    assert throttle.sendable_at(first) == 105.0
    throttle.sent(first, 105.0)
    (again,) = bursts([view(2, created=110.0), view(3, account="Z", created=111.0)])
    assert throttle.sendable_at(again) == 165.0


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    b = Backoff(1.0, 8.0, random.Random(3))
    waits = [b.failed(0.0) for _ in range(6)]
    for base, wait in zip([1, 2, 4, 8, 8, 8], waits):
        assert base <= wait <= base * 1.5
    assert b.next_at == waits[-1]
    b.succeeded()
    assert b.next_at == 0.0 and b.failures == 0


def test_rate_limit_is_a_sliding_minute() -> None:
    r = RateLimit(2)
    assert r.next_at(0.0) == 0.0
    r.record(0.0)
    r.record(10.0)
    assert r.next_at(20.0) == 60.0 and r.remaining(20.0) == 0
    assert r.next_at(60.5) == 60.5 and r.remaining(60.5) == 1
