"""The mypyc-compiled hot modules against their own Python source, and the switch between them.

The install compiles ``appliance.scoring.features`` (setup.py); the source stays beside it and
runs with ``BRANCHGUARD_PURE_PYTHON=1``, without a C compiler, or when the extension is stale
(appliance/compiled.py). Both must give the same features, bit for bit: the same streams go
through the installed compiled module and a copy executed from the ``.py``.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from array import array
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

import pytest

from appliance import compiled
from appliance.feed.simulate import simulate
from appliance.transaction import MILLI, Transaction, encode, parse, subject_for

from .support import make_transactions, send, stored_count, wait_until

NAME = "appliance.scoring.features"


def _c_compiler() -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    return bool(cc) and shutil.which(cc[0]) is not None


@pytest.fixture(scope="module")
def both() -> tuple[ModuleType, ModuleType]:
    """(the installed compiled module, the same module executed from its .py source)."""
    module = importlib.import_module(NAME)
    if not compiled.is_compiled(module):
        reason = f"{NAME} runs from its source here ({compiled.status.get(NAME)})"
        if compiled.pure_requested() or not _c_compiler():
            pytest.skip(reason)
        pytest.fail(f"{reason}, although a C compiler is present: run `pip install -e .` "
                    "(make test does) to compile it")
    pure = compiled.load_source(NAME)
    assert not compiled.is_compiled(pure) and pure.__file__.endswith(".py")
    return module, pure


def _as_parsed(txs: Iterable[Transaction], branch: str = "BR001") -> Iterator[Transaction]:
    """Each transaction as the scorer gets it: through the wire contract's parser."""
    for tx in txs:
        parsed = parse(subject_for(branch, tx), encode(tx))
        assert isinstance(parsed, Transaction), parsed
        yield parsed


def _branch_stream() -> list[Transaction]:
    """The simulator's busy branch over about five days, so every window fills and slides."""
    return list(_as_parsed(item.tx for item in simulate(
        3, start=datetime(2026, 2, 2, tzinfo=timezone.utc), rate=0.1, count=40_000,
        accounts=400, terminals=40)))


def _big_spender_stream() -> list[Transaction]:
    """Accounts whose sums run far past 2**53 thousandths (and their squares past 2**62),
    amounts up to the contract's largest, some events late: where integer and float
    arithmetic differ first."""
    rng = random.Random(16)
    base = datetime(2026, 3, 1, tzinfo=timezone.utc)
    txs = []
    for i in range(6_000):
        account = rng.randrange(12)
        scale = (100.0, 10_000.0, 999_999_999.0)[account % 3]
        late = rng.random() < 0.05
        t = i * 97.0 - (rng.uniform(0, 700_000) if late else 0.0)
        txs.append(Transaction(
            transaction_id=f"big-{i}", account_id=f"A{account}",
            amount=max(0.001, round(rng.uniform(0.01, 1.0) * scale, 2)), currency="EUR",
            timestamp=base + timedelta(seconds=t), terminal_id=f"T{rng.randrange(5)}",
            channel="POS", merchant_category=rng.choice([None, "Fuel", "Gambling"]),
            location=rng.choice([None, "Espoo", "Turku"])))
    return list(_as_parsed(txs))


def _whale_stream() -> list[Transaction]:
    """One account and one terminal near the contract's largest amount every minute for a
    week: sums past 2**53 thousandths, odd ones too (a double holds only the even ones)."""
    base = datetime(2026, 4, 6, tzinfo=timezone.utc)
    return list(_as_parsed(Transaction(
        transaction_id=f"whale-{i}", account_id="A-WHALE", amount=999_999_999.999 - i % 7 / 500,
        currency="EUR", timestamp=base + timedelta(minutes=i), terminal_id="T-WHALE",
        channel="ONLINE") for i in range(10_500)))


def _first_difference(names: tuple[str, ...], txs: list[Transaction],
                      left: list[tuple[float, ...]], right: list[tuple[float, ...]]) -> str:
    for tx, a, b in zip(txs, left, right):
        if array("d", a).tobytes() != array("d", b).tobytes():
            wrong = [f"{name}: {x!r} compiled, {y!r} pure" for name, x, y in zip(names, a, b)
                     if array("d", [x]).tobytes() != array("d", [y]).tobytes()]
            return f"{tx.transaction_id}: {'; '.join(wrong)}"
    return ""


@pytest.mark.parametrize("stream", [_branch_stream, _big_spender_stream, _whale_stream],
                         ids=["simulated-branch", "big-spenders", "whale"])
def test_compiled_and_pure_features_are_bit_identical(both: tuple[ModuleType, ModuleType],
                                                      stream: object) -> None:
    native, pure = both
    assert callable(stream)
    txs: list[Transaction] = stream()
    live_native, live_pure = native.FeatureState(), pure.FeatureState()
    got_native = [live_native.observe(tx) for tx in txs]
    got_pure = [live_pure.observe(tx) for tx in txs]
    assert len(got_native) == len(got_pure) == len(txs)
    assert all(type(v) is float for row in got_native for v in row)
    assert all(type(v) is float for row in got_pure for v in row)
    difference = _first_difference(native.FEATURES, txs, got_native, got_pure)
    assert difference == "", difference
    assert live_native.snapshot() == live_pure.snapshot()

    # the restart path: the state rebuilt from the stored rows, in (ts, processing) order
    rows = sorted(((tx.account_id, tx.terminal_id, tx.timestamp.timestamp(),
                    round(tx.amount * MILLI), tx.location, tx.merchant_category)
                   for tx in txs), key=lambda row: row[2])
    assert (native.FeatureState.rebuild(rows).snapshot()
            == pure.FeatureState.rebuild(rows).snapshot())


def _imported_from(env: dict[str, str]) -> str:
    """Where a fresh interpreter imports the features module from, under ``env``."""
    code = f"import {NAME} as m, appliance.compiled as c; print(m.__file__); print(c.status)"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return out.splitlines()[0]


def test_branchguard_pure_python_runs_the_source(both: tuple[ModuleType, ModuleType]) -> None:
    env = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    assert _imported_from(env).endswith(".so")
    assert _imported_from({**env, compiled.PURE_ENV: "1"}).endswith("features.py")
    assert _imported_from({**env, compiled.PURE_ENV: "0"}).endswith(".so")


def _layout(root: Path, source: str, built: bool, stamped_from: str | None) -> None:
    """A package tree as an install leaves it: the source, maybe an extension and a stamp."""
    package = root / "appliance" / "scoring"
    package.mkdir(parents=True)
    (package / "features.py").write_text(source)
    if built:
        (package / ("features" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"")
    if stamped_from is not None:
        digest = compiled.hashlib.sha256(stamped_from.encode()).hexdigest()
        (root / "appliance" / compiled.STAMP).write_text(f'{{"{NAME}": "{digest}"}}')


@pytest.mark.parametrize(("built", "stamped_from", "env", "expected"), [
    (True, "x = 1\n", {}, compiled.COMPILED),
    (True, "x = 1\n", {compiled.PURE_ENV: "1"}, compiled.ASKED),
    (True, "x = 1\n", {compiled.PURE_ENV: "0"}, compiled.COMPILED),
    (False, None, {}, compiled.NOT_BUILT),
    (True, "x = 0\n", {}, compiled.STALE),  # the source changed after the compile
    (True, None, {}, compiled.STALE),       # an extension nobody stamped
])
def test_the_extension_is_used_only_when_built_from_the_source_beside_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: bool, stamped_from: str | None,
        env: dict[str, str], expected: str) -> None:
    _layout(tmp_path, "x = 1\n", built, stamped_from)
    monkeypatch.setattr(compiled, "_PACKAGE_ROOT", tmp_path)
    assert compiled.decide(NAME, env) == expected


def test_a_node_on_the_pure_path_scores_and_says_so(tmp_path: Path, nats_url: str,
                                                     node_factory: type) -> None:
    node = node_factory(tmp_path / "node", nats_url, {compiled.PURE_ENV: "1"}).start()
    txs = [item.tx for item in make_transactions(200)]
    assert send(nats_url, txs) == len(txs)
    db = tmp_path / "node" / "branchguard.db"
    wait_until(lambda: stored_count(db) == len(txs), message="all 200 scored and stored")
    ready = next(json.loads(line) for line in node.log().splitlines()
                 if '"node.ready"' in line)
    assert ready["compiled"] == {NAME: compiled.ASKED}
    assert '"compiled.not_used"' not in node.log()  # asked for: no warning
