"""The writer's cost per row by the size of its groups: CPU and WAL frames.

Why the group size matters (scoring/commit.py): the transactions' indexes, the account index
above all, take their inserts in no order, so each row dirties about one index page whatever
the group's size, and a larger group shares those pages between more rows. Every frame the
WAL gets is copied again by the checkpoint and by Litestream, so frames per row is the
figure that carries over to the node; it is also exact (the same on any machine), where the
CPU figure moves with the machine's load.

The throughput benchmark's stream (a busy branch: 10,000 accounts, 1,000 terminals) is
scored once, then stored through :meth:`Store.save_batch` into a fresh database for each
group size, the sizes alternating ``rounds`` times, with a PASSIVE checkpoint from another
connection every ``checkpoint_every`` rows (as the node's checkpoint thread does about once
a second). The CPU is the process time inside ``save_batch`` only.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from ..scoring.features import FEATURES_VERSION, FeatureState
from ..scoring.model import Model
from ..settings import load
from ..store import Scored, Store
from ..transaction import digest
from .throughput import scored_history


@dataclass
class GroupFigures:
    """One group size: µs of CPU per row in each round, and WAL frames per row."""

    rows_per_group: int
    us_per_row: list[float] = field(default_factory=list)
    wal_frames_per_row: float = 0.0


@dataclass
class WriterReport:
    rows: int
    checkpoint_every: int
    groups: list[GroupFigures]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def scored_stream(rows: int, seed: int = 5) -> list[Scored]:
    """``rows`` transactions of the throughput benchmark's stream, scored as the node scores
    them (:func:`.throughput.scored_history`), numbered and with their body digests, ready
    to store."""
    settings = load(None, env={})
    model = Model.load(settings.models_dir, settings.model_version)
    out: list[Scored] = []
    for chunk in scored_history(settings, model, FeatureState(), rows, seed):
        out += [Scored(tx, settings.branch, len(out) + i + 1, f, FEATURES_VERSION, v,
                       digest(tx)) for i, (tx, f, v) in enumerate(chunk)]
    return out


def _store_in_groups(scored: list[Scored], size: int, checkpoint_every: int,
                     directory: Path) -> tuple[float, int]:
    """Store ``scored`` in groups of ``size`` rows into a new database in ``directory``:
    (µs of CPU per row in ``save_batch``, WAL frames written)."""
    store = Store.open(directory / "branchguard.db")
    cpu, frames, since = 0.0, 0, 0
    try:
        gc.collect()
        for start in range(0, len(scored), size):
            group = scored[start:start + size]
            began = time.process_time()
            store.save_batch(group, [], "bench-writer", group[-1].stream_seq)
            cpu += time.process_time() - began
            since += len(group)
            if since >= checkpoint_every:
                frames += _checkpoint(store)
                since = 0
        frames += _checkpoint(store)
    finally:
        store.close()
    return cpu / len(scored) * 1e6, frames


def _checkpoint(store: Store) -> int:
    """Checkpoint the WAL; the frames it held, once all are copied (the next commit then
    writes the WAL from its start, so nothing is counted twice)."""
    _, wal_frames, copied = store.checkpoint_wal()
    return wal_frames if copied == wal_frames else 0


def measure_writer(rows: int = 300_000, groups: tuple[int, ...] = (500, 5000),
                   rounds: int = 2, checkpoint_every: int = 15_000, seed: int = 5
                   ) -> WriterReport:
    """Store the same ``rows`` scored transactions in groups of each size of ``groups``,
    alternately, ``rounds`` times (see the module docstring)."""
    if rows < 1 or rounds < 1 or not groups or min(groups) < 1 or checkpoint_every < 1:
        raise SettingsError("need rows, rounds, checkpoint_every and every group size >= 1",
                            field="rows", value=(rows, groups, rounds, checkpoint_every))
    scored = scored_stream(rows, seed)
    report = WriterReport(rows, checkpoint_every, [GroupFigures(size) for size in groups])
    root = Path(tempfile.mkdtemp(prefix="branchguard-bench-writer-"))
    try:
        for _ in range(rounds):
            for figures in report.groups:
                directory = Path(tempfile.mkdtemp(dir=root))
                us, frames = _store_in_groups(scored, figures.rows_per_group,
                                              checkpoint_every, directory)
                shutil.rmtree(directory, ignore_errors=True)
                figures.us_per_row.append(round(us, 2))
                figures.wal_frames_per_row = round(frames / rows, 3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report


def format_writer(report: WriterReport) -> str:
    """The report as lines for a terminal."""
    lines = [f"Store.save_batch, {report.rows:,} rows into a new database, a checkpoint every "
             f"{report.checkpoint_every:,} rows (CPU: median of "
             f"{len(report.groups[0].us_per_row)} rounds)",
             f"{'rows/group':>10}  {'CPU µs/row':>10}  {'WAL frames/row':>14}  rounds"]
    for g in report.groups:
        runs = " / ".join(f"{v:.2f}" for v in g.us_per_row)
        lines.append(f"{g.rows_per_group:>10,}  {statistics.median(g.us_per_row):>10.2f}  "
                     f"{g.wal_frames_per_row:>14.3f}  {runs}")
    return "\n".join(lines)
