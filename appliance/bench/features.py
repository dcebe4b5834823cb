"""CPU per transaction of ``FeatureState.observe``, compiled by mypyc against pure Python.

The stage where pure Python was the scorer's biggest cost (docs/benchmarks.md). The same
simulated stream as the throughput benchmark's (a busy branch: 50 tx/s of event time, 10,000
accounts, 1,000 terminals) goes through the installed module and through a copy of it
executed from its ``.py`` (:func:`appliance.compiled.load_source`). Each first observes
``warm`` transactions untimed, so that accounts have a history and the windows slide, then
``count`` more timed by process CPU time; the two alternate ``rounds`` times and the medians
are reported. Both must give the same features bit for bit, and the report says so.
"""

from __future__ import annotations

import gc
import importlib
import itertools
import statistics
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from types import ModuleType
from typing import Any

from .. import compiled
from ..errors import BranchguardError, SettingsError
from ..feed.simulate import simulate
from ..feed.terminal import population
from ..transaction import Transaction, encode, parse, subject_for
from .throughput import EVENT_RATE

MODULE = "appliance.scoring.features"


@dataclass
class FeaturesReport:
    """µs of CPU per transaction, one value per round (``compiled_us`` empty when the
    installed module is not compiled: ``status`` says why)."""

    status: str
    count: int
    warm: int
    pure_us: list[float]
    compiled_us: list[float]
    identical: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stream(seed: int, n: int) -> list[Transaction]:
    """The throughput benchmark's load, each transaction through the wire parser as the
    scorer gets it."""
    accounts, terminals = population(EVENT_RATE)
    out = []
    for item in itertools.islice(simulate(
            seed, start=datetime(2025, 6, 2, tzinfo=timezone.utc), rate=EVENT_RATE,
            diurnal=False, accounts=accounts, terminals=terminals), n):
        parsed = parse(subject_for("BR001", item.tx), encode(item.tx))
        if not isinstance(parsed, Transaction):  # the simulator broke the contract
            raise BranchguardError(f"simulated transaction rejected: {parsed.reason}")
        out.append(parsed)
    return out


def _timed(module: ModuleType, warm: list[Transaction], hot: list[Transaction]
           ) -> tuple[float, list[tuple[float, ...]]]:
    """µs of CPU per transaction of ``hot``, after ``warm`` went through the same state."""
    state = module.FeatureState()
    observe: Callable[[Transaction], tuple[float, ...]] = state.observe
    for tx in warm:
        observe(tx)
    gc.collect()
    gc.disable()  # a collection landing in one module's run and not the other's is noise
    try:
        start = time.process_time()
        features = [observe(tx) for tx in hot]
        elapsed = time.process_time() - start
    finally:
        gc.enable()
    return elapsed / len(hot) * 1e6, features


def measure_features(count: int = 50_000, warm: int = 200_000, rounds: int = 3,
                     seed: int = 7) -> FeaturesReport:
    """Time ``observe`` on ``count`` transactions after ``warm`` untimed ones, pure and (when
    installed) compiled, alternately, ``rounds`` times."""
    if count < 1 or warm < 0 or rounds < 1:
        raise SettingsError("need count >= 1, warm >= 0 and rounds >= 1", field="count",
                            value=(count, warm, rounds))
    installed = importlib.import_module(MODULE)
    pure = compiled.load_source(MODULE)
    native = installed if compiled.is_compiled(installed) else None
    txs = _stream(seed, warm + count)
    before, hot = txs[:warm], txs[warm:]
    report = FeaturesReport(status=compiled.status[MODULE],
                            count=count, warm=warm, pure_us=[], compiled_us=[],
                            identical=True)
    for _ in range(rounds):
        us, pure_features = _timed(pure, before, hot)
        report.pure_us.append(round(us, 2))
        if native is not None:
            us, native_features = _timed(native, before, hot)
            report.compiled_us.append(round(us, 2))
            report.identical = report.identical and all(
                array("d", a).tobytes() == array("d", b).tobytes()
                for a, b in zip(pure_features, native_features))
    return report


def format_features(report: FeaturesReport) -> str:
    """The report as lines for a terminal."""
    def line(label: str, values: list[float]) -> str:
        runs = " / ".join(f"{v:.2f}" for v in values)
        return f"{label:<9} {statistics.median(values):6.2f} µs/tx  (rounds: {runs})"

    lines = [f"FeatureState.observe, {report.count:,} transactions after {report.warm:,} "
             f"(CPU time, median of {len(report.pure_us)})",
             line("pure", report.pure_us)]
    if report.compiled_us:
        gain = 1 - statistics.median(report.compiled_us) / statistics.median(report.pure_us)
        lines.append(line("compiled", report.compiled_us) + f"  {gain:.0%} less")
        lines.append("features bit-identical: " + ("yes" if report.identical else "NO"))
    else:
        lines.append(f"compiled  -  ({report.status})")
    return "\n".join(lines)
