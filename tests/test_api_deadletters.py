"""Dead-letter routes: analysts read what the scorer refused, newest first, in pages, with
reason, subject, stream sequence, time and the body (text, or base64 when it is not UTF-8);
viewers are refused; an unknown sequence is a 404."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from starlette.testclient import TestClient

from appliance.settings import Settings
from appliance.store import DeadLetter, Store
from tests.api_support import Keys, client, node_db, role_keys  # noqa: F401

BODIES = {
    1001: ("tx.BR001.T1.A1", "bad json: eof", b'{"transaction_id": "<b>X</b>"'),
    1002: ("tx.BR001.T2.A2", "subject does not match terminal_id/account_id in body",
           '{"location": "\u202eevil"}'.encode()),
    1003: ("tx.BR001.T3.A3", "bad json: invalid character", b"\xff\xfe\x00\x80"),
    1004: ("tx.BR001.T4.A4", "oversize: 9000 bytes > 8192", b"y" * 9000),
}


@pytest.fixture
def letters(node_db: tuple[Settings, Store]) -> None:  # noqa: F811
    store = node_db[1]
    store.save_batch([], [DeadLetter(seq, subject, reason, len(body), body)
                          for seq, (subject, reason, body) in BODIES.items()], "scorer", 1004)


def get(client: TestClient, keys: Keys, path: str, role: str = "analyst",  # noqa: F811
        **params: Any) -> Any:
    r = client.get(path, params=params, headers=keys.header(role))
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.usefixtures("letters")
def test_analysts_page_through_dead_letters_newest_first(client: TestClient,  # noqa: F811
                                                          role_keys: Keys) -> None:  # noqa: F811
    first = get(client, role_keys, "/api/v1/dead-letters", limit=3)
    assert [d["stream_seq"] for d in first["dead_letters"]] == [1004, 1003, 1002]
    assert first["next_before_seq"] == 1002
    rest = get(client, role_keys, "/api/v1/dead-letters", limit=3, before_seq=1002)
    assert [d["stream_seq"] for d in rest["dead_letters"]] == [1001]
    assert rest["next_before_seq"] is None
    by_seq = {d["stream_seq"]: d for d in first["dead_letters"] + rest["dead_letters"]}
    for seq, (subject, reason, body) in BODIES.items():
        d = by_seq[seq]
        assert (d["subject"], d["reason"], d["size"]) == (subject, reason, len(body))
        assert d["received_at"] > 0 and d["body_recorded"] and not d["resubmitted"]
    assert by_seq[1001]["body"] == '{"transaction_id": "<b>X</b>"'
    assert by_seq[1002]["body"] == '{"location": "\u202eevil"}'
    assert by_seq[1003]["body"] is None
    assert base64.b64decode(by_seq[1003]["body_base64"]) == BODIES[1003][2]
    assert by_seq[1004]["truncated"] and len(by_seq[1004]["body"]) == 8192
    only = get(client, role_keys, "/api/v1/dead-letters", reason="Subject does")
    assert [d["stream_seq"] for d in only["dead_letters"]] == [1002]


@pytest.mark.usefixtures("letters")
def test_one_dead_letter_and_who_may_read_it(client: TestClient,  # noqa: F811
                                             role_keys: Keys) -> None:  # noqa: F811
    one = get(client, role_keys, "/api/v1/dead-letters/1001", role="supervisor")
    assert one["body"] == BODIES[1001][2].decode() and one["resubmissions"] == []
    assert client.get("/api/v1/dead-letters/1001",
                      headers=role_keys.header("viewer")).status_code == 403
    assert client.get("/api/v1/dead-letters").status_code == 401
    missing = client.get("/api/v1/dead-letters/5", headers=role_keys.header("analyst"))
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "stream_seq"
    bad = client.get("/api/v1/dead-letters", params={"before_seq": "x"},
                     headers=role_keys.header("analyst"))
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "before_seq"
