"""The OpenAPI schema lists every route, and schemathesis, generating requests from it,
finds no 5xx (and every 4xx is a JSON error naming its field or saying why)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from starlette.testclient import TestClient

from appliance.api.app import OPENAPI_PATH, create_app, specs
from appliance.casework import keys
from appliance.change import connect_writer
from appliance.store import DeadLetter, Store
from tests.api_support import api_settings, client, fill, node_db  # noqa: F401


def test_every_route_is_in_the_schema(client: TestClient) -> None:
    schema = client.get(OPENAPI_PATH).json()
    assert schema["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in schema["paths"].items() for method in ops}
    for spec in specs():
        path = spec.path.replace(":int}", "}")
        assert (path, spec.method.lower()) in documented, spec.path
        op = schema["paths"][path][spec.method.lower()]
        assert op["summary"] and "responses" in op
        if spec.role is None:
            assert op.get("security") == [], spec.path  # public routes say so
    assert len(documented) == len(specs())


def test_the_api_doc_names_every_route() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    for spec in specs():
        assert f"`{spec.method} {spec.path.replace(':int}', '}')}`" in text, spec.path


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    settings = api_settings(tmp_path_factory.mktemp("fuzz"), api_rate_per_second=1e6,
                            api_rate_burst=1_000_000)
    store = Store.open(settings.db_path)
    fill(store, 200)
    store.save_batch([], [DeadLetter(300 + i, "tx.BR001.T1.A1", f"bad json: {i}", len(body),
                                     body)
                          for i, body in enumerate((b"{", b"\xff\x00", b"z" * 9000))],
                     "scorer", 302)
    writer = connect_writer(settings.db_path)
    admin = keys.create(writer, "fuzz", "admin", "test")[1]
    writer.close()
    app = create_app(settings)
    yield app, admin
    app.state.api.close()
    store.close()


@pytest.fixture(scope="module")
def operations(fuzz_target: tuple[Any, str]) -> list[Any]:
    schema = schemathesis.openapi.from_asgi(OPENAPI_PATH, fuzz_target[0])
    return [result.ok() for result in schema.get_all_operations()]


# schemathesis's own pytest plugin does not run on pytest 9, so its strategies are drawn
# from a plain hypothesis test: one operation and one generated request per example.
@hsettings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_generated_request_gets_a_5xx(data: st.DataObject, operations: list[Any],
                                         fuzz_target: tuple[Any, str]) -> None:
    _, admin = fuzz_target
    operation = data.draw(st.sampled_from(operations), label="operation")
    case = data.draw(operation.as_strategy(), label="case")
    headers = data.draw(st.sampled_from([{"Authorization": f"Bearer {admin}"}, {}]))
    response = case.call(headers=headers)
    if case.formatted_path == "/readyz":  # 503 is its answer when NATS is not there
        assert response.status_code in (200, 429, 503)
        return
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["status"] == response.status_code and error["message"]
