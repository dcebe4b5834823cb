"""The bad-input table (issue 17), transaction side: every kind of bad message below is
published to a real running node (its event-time window on, USD accepted at a rate), then
good ones. Each bad one is dead-lettered with its reason and counted, none is stored, the
good ones after them are scored, and the console's pages and the API render what is stored
without a 5xx. docs/bad-inputs.md is this table with what happened; a test keeps them in
step."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from nicegui.testing import User
from starlette.testclient import TestClient

from appliance.api.app import create_app
from appliance.settings import load
from appliance.store import Store
from tests.api_support import _keys
from tests.console_support import add_user
from tests.support import query, read_stream, send_raw, stored_count, wait_until
from tests.test_console_pages import sign_in, simulate

Node = type  # the node_factory fixture yields a NodeProcess subclass
DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-inputs.md"
SUBJECT = "tx.BR001.T0001.A-BAD"
WINDOW_ON = {"BRANCHGUARD_EVENT_TIME_CHECK": "true", "BRANCHGUARD_CURRENCY": "EUR",
             "BRANCHGUARD_CURRENCY_RATES": "USD=0.92"}


def fields(now: datetime, tid: str, **changes: Any) -> dict[str, Any]:
    """A good body; a change to ``...`` removes the field."""
    data = {"transaction_id": tid, "account_id": "A-BAD", "amount": 42.5, "currency": "EUR",
            "timestamp": now.isoformat(), "terminal_id": "T0001", "channel": "POS",
            "merchant_category": "Grocery", "location": "Espoo", **changes}
    return {k: v for k, v in data.items() if v is not ...}


def body(now: datetime, tid: str, **changes: Any) -> bytes:
    return json.dumps(fields(now, tid, **changes), ensure_ascii=False).encode()


def spliced(now: datetime, tid: str, fragment: str) -> bytes:
    """A good body with raw JSON ``fragment`` (``"key": value``) added as its last member."""
    return body(now, tid)[:-1] + b", " + fragment.encode() + b"}"


Case = tuple[str, str, str, Callable[[datetime, str], bytes], str]
"""(kind, example as the docs show it, subject, body maker, expected reason prefix)."""

CASES: list[Case] = [
    ("empty body", "(0 bytes)", SUBJECT, lambda n, t: b"", "bad json: "),
    ("not JSON", "{not json", SUBJECT, lambda n, t: b"{not json", "bad json: "),
    ("truncated JSON", '{"transaction_id": "x"', SUBJECT,
     lambda n, t: body(n, t)[:40], "bad json: "),
    ("trailing comma", '{..., "channel": "POS",}', SUBJECT,
     lambda n, t: body(n, t)[:-1] + b",}", "bad json: "),
    ("byte order mark", "EF BB BF before the object", SUBJECT,
     lambda n, t: b"\xef\xbb\xbf" + body(n, t), "bad json: "),
    ("not UTF-8", '"location": "\\xff\\xfe" (raw bytes)', SUBJECT,
     lambda n, t: body(n, t).replace(b"Espoo", b"\xff\xfe"), "bad json: Invalid UTF-8"),
    ("NaN", '"amount": NaN', SUBJECT,
     lambda n, t: body(n, t).replace(b"42.5", b"NaN"), "bad json: "),
    ("Infinity", '"amount": Infinity', SUBJECT,
     lambda n, t: body(n, t).replace(b"42.5", b"Infinity"), "bad json: "),
    ("nested a thousand deep", '"junk": [[[[...]]]] (3,000 deep)', SUBJECT,
     lambda n, t: spliced(n, t, '"junk": ' + "[" * 3000 + "]" * 3000),
     "bad json: nested too deeply"),
    ("a JSON array", "[]", SUBJECT, lambda n, t: b"[]", "invalid: Expected `object`"),
    ("JSON null", "null", SUBJECT, lambda n, t: b"null", "invalid: Expected `object`"),
    ("a JSON string", '"hello"', SUBJECT, lambda n, t: b'"hello"',
     "invalid: Expected `object`"),
    ("every field null", '{"transaction_id": null, ...}', SUBJECT,
     lambda n, t: json.dumps({k: None for k in fields(n, t)}).encode(), "invalid: Expected"),
    ("missing amount", "no `amount`", SUBJECT, lambda n, t: body(n, t, amount=...),
     "invalid: Object missing required field `amount`"),
    ("missing timestamp", "no `timestamp`", SUBJECT, lambda n, t: body(n, t, timestamp=...),
     "invalid: Object missing required field `timestamp`"),
    ("amount as a string", '"amount": "42.5"', SUBJECT,
     lambda n, t: body(n, t, amount="42.5"), "invalid: Expected `float`, got `str`"),
    ("amount as a boolean", '"amount": true', SUBJECT, lambda n, t: body(n, t, amount=True),
     "invalid: Expected `float`, got `bool`"),
    ("zero amount", '"amount": 0', SUBJECT, lambda n, t: body(n, t, amount=0),
     "invalid: Expected `float` > 0.0"),
    ("negative amount", '"amount": -5', SUBJECT, lambda n, t: body(n, t, amount=-5),
     "invalid: Expected `float` > 0.0"),
    ("huge amount", '"amount": 1e12', SUBJECT, lambda n, t: body(n, t, amount=1e12),
     "invalid: Expected `float` < 1000000000.0"),
    ("a 40-digit amount", '"amount": 9999...9 (40 digits)', SUBJECT,
     lambda n, t: body(n, t).replace(b"42.5", b"9" * 40), "invalid: Expected `float` <"),
    ("amount beyond a double", '"amount": 1e400', SUBJECT,
     lambda n, t: body(n, t).replace(b"42.5", b"1e400"), "invalid: Number out of range"),
    ("id with a dot", '"transaction_id": "a.b"', SUBJECT,
     lambda n, t: body(n, t, transaction_id=t + ".b"),
     "invalid: `transaction_id` must match"),
    ("id of 65 characters", '"transaction_id": "xxx...x"', SUBJECT,
     lambda n, t: body(n, t, transaction_id="x" * 65), "invalid: Expected `str` of length"),
    ("id as a number", '"transaction_id": 12', SUBJECT,
     lambda n, t: body(n, t, transaction_id=12), "invalid: Expected `str`, got `int`"),
    ("unknown channel", '"channel": "WEB"', SUBJECT, lambda n, t: body(n, t, channel="WEB"),
     "invalid: Invalid enum value 'WEB'"),
    ("channel in lower case", '"channel": "pos"', SUBJECT,
     lambda n, t: body(n, t, channel="pos"), "invalid: Invalid enum value 'pos'"),
    ("currency not in ISO 4217", '"currency": "XYZ"', SUBJECT,
     lambda n, t: body(n, t, currency="XYZ"),
     "invalid: `currency` must be an ISO 4217 code such as EUR"),
    ("currency in lower case", '"currency": "eur"', SUBJECT,
     lambda n, t: body(n, t, currency="eur"),
     "invalid: `currency` must be an ISO 4217 code such as EUR"),
    ("currency with no rate", '"currency": "JPY"', SUBJECT,
     lambda n, t: body(n, t, currency="JPY"), "currency not accepted: JPY"),
    ("timestamp without an offset", '"timestamp": "2026-12-07T10:00:00"', SUBJECT,
     lambda n, t: body(n, t, timestamp=n.replace(tzinfo=None).isoformat()),
     "invalid: Expected `datetime` with a timezone component"),
    ("timestamp as a number", '"timestamp": 1796000000', SUBJECT,
     lambda n, t: body(n, t, timestamp=int(n.timestamp())), "invalid: Expected `datetime`"),
    ("garbage timestamp", '"timestamp": "yesterday"', SUBJECT,
     lambda n, t: body(n, t, timestamp="yesterday"), "invalid: Invalid RFC3339"),
    ("year 10000 (UTC)", '"timestamp": "9999-12-31T23:59:59-14:00"', SUBJECT,
     lambda n, t: body(n, t, timestamp="9999-12-31T23:59:59-14:00"),
     "event time too far in the future: 9999-12-31T23:59:59-14:00"),
    ("year 0 (UTC)", '"timestamp": "0001-01-01T00:00:00+14:00"', SUBJECT,
     lambda n, t: body(n, t, timestamp="0001-01-01T00:00:00+14:00"),
     "event time too old: 0001-01-01T00:00:00+14:00"),
    ("dated 2099", '"timestamp": "2099-01-01T00:00:00Z"', SUBJECT,
     lambda n, t: body(n, t, timestamp="2099-01-01T00:00:00Z"),
     "event time too far in the future"),
    ("an hour ahead", "the node's time + 1 h", SUBJECT,
     lambda n, t: body(n, t, timestamp=(n + timedelta(hours=1)).isoformat()),
     "event time too far in the future"),
    ("eight days late", "the node's time - 8 days", SUBJECT,
     lambda n, t: body(n, t, timestamp=(n - timedelta(days=8)).isoformat()),
     "event time too old"),
    ("NUL in location", '"location": "Esp\\u0000oo"', SUBJECT,
     lambda n, t: body(n, t, location="Esp\x00oo"),
     "invalid: `location` holds a control character (U+0000)"),
    ("BEL in location", '"location": "Esp\\u0007oo"', SUBJECT,
     lambda n, t: body(n, t, location="Esp\x07oo"),
     "invalid: `location` holds a control character (U+0007)"),
    ("right-to-left override in location", '"location": "Esp\\u202eoo"', SUBJECT,
     lambda n, t: body(n, t, location="Esp\u202eoo"),
     "invalid: `location` holds a bidirectional control (U+202E)"),
    ("ESC in merchant_category", '"merchant_category": "\\u001b[31mGrocery"', SUBJECT,
     lambda n, t: body(n, t, merchant_category="\x1b[31mGrocery"),
     "invalid: `merchant_category` holds a control character (U+001B)"),
    ("isolate in merchant_category", '"merchant_category": "Groc\\u2066ery"', SUBJECT,
     lambda n, t: body(n, t, merchant_category="Groc\u2066ery"),
     "invalid: `merchant_category` holds a bidirectional control (U+2066)"),
    ("C1 control in location", '"location": "Esp\\u0085oo"', SUBJECT,
     lambda n, t: body(n, t, location="Esp\x85oo"),
     "invalid: `location` holds a control character (U+0085)"),
    ("empty location", '"location": ""', SUBJECT, lambda n, t: body(n, t, location=""),
     "invalid: Expected `str` of length >= 1"),
    ("location of 65 characters", '"location": "xxx...x"', SUBJECT,
     lambda n, t: body(n, t, location="x" * 65), "invalid: Expected `str` of length <= 64"),
    ("location as a list", '"location": ["Espoo"]', SUBJECT,
     lambda n, t: body(n, t, location=["Espoo"]), "invalid: Expected `str | null`"),
    ("location as nested junk", '"location": {"a": {"b": 1}}', SUBJECT,
     lambda n, t: body(n, t, location={"a": {"b": 1}}), "invalid: Expected `str | null`"),
    ("amount twice", '"amount": 42.5, ..., "amount": 8888', SUBJECT,
     lambda n, t: spliced(n, t, '"amount": 8888'), "invalid: duplicate key `amount`"),
    ("amount twice, one escaped", '"\\u0061mount": 8888', SUBJECT,
     lambda n, t: spliced(n, t, '"\\u0061mount": 8888'), "invalid: duplicate key `amount`"),
    ("a repeated unknown key", '"x": 1, "x": 2', SUBJECT,
     lambda n, t: spliced(n, t, '"x": 1, "x": 2'), "invalid: duplicate key `x`"),
    ("contract version 2", '"version": 2', SUBJECT, lambda n, t: body(n, t, version=2),
     "unsupported contract version 2"),
    ("version as a string", '"version": "1"', SUBJECT, lambda n, t: body(n, t, version="1"),
     "invalid: Expected `int`, got `str`"),
    ("subject of three tokens", "tx.BR001.T0001", "tx.BR001.T0001",
     lambda n, t: body(n, t), "bad subject: expected tx.<branch>.<terminal>.<account>"),
    ("subject of five tokens", "tx.BR001.T0001.A-BAD.x", SUBJECT + ".x",
     lambda n, t: body(n, t), "bad subject: expected tx.<branch>.<terminal>.<account>"),
    ("subject naming another account", "tx.BR001.T0001.A-OTHER", "tx.BR001.T0001.A-OTHER",
     lambda n, t: body(n, t), "subject does not match terminal_id/account_id in body"),
    ("subject naming another terminal", "tx.BR001.T0002.A-BAD", "tx.BR001.T0002.A-BAD",
     lambda n, t: body(n, t), "subject does not match terminal_id/account_id in body"),
    ("oversize", "9,000 bytes", SUBJECT,
     lambda n, t: body(n, t)[:-1] + b', "pad": "' + b"x" * 9000 + b'"}', "oversize: "),
]


def bad_messages(now: datetime) -> list[tuple[str, str, bytes, str]]:
    """(kind, subject, data, expected reason prefix) of each case, with its own id."""
    return [(kind, subject, make(now, f"bad-{i:02d}"), expected)
            for i, (kind, _, subject, make, expected) in enumerate(CASES)]


def test_the_table_has_the_kinds_the_issue_asks_for() -> None:
    assert len(CASES) >= 40
    assert len({kind for kind, *_ in CASES}) == len(CASES)


def test_docs_bad_inputs_lists_every_kind_with_what_happened() -> None:
    lines = DOC.read_text().splitlines()
    for kind, _, _, _, expected in CASES:
        row = next((line for line in lines if line.startswith(f"| {kind} |")), None)
        assert row is not None, f"docs/bad-inputs.md has no row for {kind!r}"
        assert f"`` {expected.split(':')[0]}" in row, (kind, row)


@pytest.mark.timeout(300)
def test_every_bad_input_is_dead_lettered_and_the_node_keeps_scoring(
        tmp_path: Path, nats_url: str, node_factory: Node) -> None:
    data_dir = tmp_path / "node"
    node = node_factory(data_dir, nats_url, WINDOW_ON).start()
    db = data_dir / "branchguard.db"
    now = datetime.now(timezone(timedelta(hours=2)))
    bad = bad_messages(now)
    good = [body(now - timedelta(seconds=30 - i), f"good-{i}") for i in range(10)]
    good += [body(now, "good-usd", amount=9000, currency="USD"),
             body(now - timedelta(days=3), "good-late-3d"),
             body(now, "good-text", location="Jyväskylä", merchant_category="Café du Monde")]
    assert send_raw(nats_url, [(subject, data, f"bad-{i:02d}")
                               for i, (_, subject, data, _) in enumerate(bad)])
    assert send_raw(nats_url, [(SUBJECT, data, f"good-{i}") for i, data in enumerate(good)])

    wait_until(lambda: stored_count(db) == len(good), message="the good ones scored")
    wait_until(lambda: query(db, "SELECT count(*) FROM dead_letters")[0][0] == len(bad),
               message="every bad one dead-lettered")
    dlq = read_stream(nats_url, "TX_DLQ", expect=len(bad))
    assert len(dlq) == len(bad)
    for (kind, subject, data, expected), msg in zip(bad, dlq):
        reason = msg.headers["Branchguard-Reason"]
        assert reason.startswith(expected), f"{kind}: {reason}"
        assert msg.data == data, kind  # the message as it came, unchanged
        assert msg.headers["Branchguard-Subject"] == subject, kind
    stored = {r[0] for r in query(db, "SELECT transaction_id FROM transactions")}
    assert stored == {json.loads(g)["transaction_id"] for g in good}
    rows = query(db, "SELECT reason FROM dead_letters ORDER BY stream_seq")
    assert [r[0] for r in rows] == [m.headers["Branchguard-Reason"] for m in dlq]
    assert node.log().count('"event":"tx.dead_lettered"') == len(bad)
    assert '"event":"node.ready"' in node.log() and "Traceback" not in node.log()

    # the node is still scoring, and its console and API render what it stored
    assert send_raw(nats_url, [(SUBJECT, body(now, "after-all"), "after-all")])
    wait_until(lambda: stored_count(db) == len(good) + 1, message="scored after it all")
    node.stop()
    _console_and_api_render(load(None, env={}, data_dir=data_dir, nats_url=nats_url))


def _console_and_api_render(settings: Any) -> None:
    store = Store.open(settings.db_path)
    try:
        counts = store.counts()
        alert_ids = [r[0] for r in store.reader.execute("SELECT alert_id FROM alerts")]
    finally:
        store.close()
    assert counts["dead_letters"] == len(CASES)
    assert alert_ids, "the USD 9000 (8280 EUR) transaction raises an alert"
    header = {"Authorization": f"Bearer {_keys(settings).admin}"}
    with TestClient(create_app(settings)) as client:
        for path in ("/api/v1/alerts", "/api/v1/alerts?sort=-ts", "/api/v1/stats",
                     "/api/v1/accounts/A-BAD/transactions", "/metrics",
                     *(f"/api/v1/alerts/{a}" for a in alert_ids),
                     *(f"/api/v1/alerts/{a}/related" for a in alert_ids)):
            response = client.get(path, headers=header)
            assert response.status_code == 200, (path, response.text[:300])
        history = client.get("/api/v1/accounts/A-BAD/transactions", headers=header).json()
        usd = next(t for t in history["transactions"] if t["transaction_id"] == "good-usd")
        assert (usd["amount"], usd["currency"], usd["sent_amount"], usd["sent_currency"]) == \
            (8280.0, "EUR", 9000.0, "USD")
    password = add_user(settings, "ada", "admin")

    async def scenario(user: User) -> None:
        await sign_in(user, "ada", password)
        await user.should_see(f"{len(alert_ids)} alerts")
        for alert_id in alert_ids:
            await user.open(f"/case/{alert_id}")
            await user.should_see("Why it was flagged")
        await user.open("/overview")
        await user.should_see(f"dead letters: {len(CASES)}")
        for page, text in (("/lists", "Add"), ("/models", "Registry")):
            await user.open(page)
            await user.should_see(text)

    simulate(settings, scenario)
