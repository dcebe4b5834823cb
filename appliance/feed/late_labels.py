"""The demo's labels, arriving late the way chargebacks do, through ``labels import``.

A fraud is known when its customer disputes it: 2 to 10 days after the episode (one delay
per episode, since a customer reports the whole episode at once; drawn from the episode id,
so it is the same on every run). A genuine transaction is known as genuine when the
chargeback window closes, :data:`SETTLED_DAYS` after it. Labels are delivered as a CSV file
(``transaction_id,label,known_at,source``, gzipped) and imported with
``scoring.labels.import_labels``, the code of ``branchguard labels import``, only once the
clock has passed their ``known_at``: nothing is known before its time.

The ``source`` column carries what the evaluation needs: ``demo-chargeback:<typology>:<episode
id>`` for a fraud, ``demo-settled`` for a genuine transaction (``evaluate --demo`` reads the
typology and episode back from it; no schema change).
"""

from __future__ import annotations

import csv
import gzip
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Final

from .. import logs
from ..scoring.labels import ImportResult, import_labels, rfc3339
from .simulate import Labelled
from .world import World, events_between

log = logs.get("appliance.late_labels")

FRAUD_DELAY_DAYS: Final = (2.0, 10.0)
"""A fraud's label arrives this many days after the transaction (uniform, per episode)."""
SETTLED_DAYS: Final = 10.0
"""A genuine transaction's label arrives when its chargeback window closes."""
SOURCE_FRAUD: Final = "demo-chargeback"
SOURCE_GENUINE: Final = "demo-settled"
_DAY: Final = 86400.0


@dataclass(frozen=True, slots=True)
class LateLabel:
    transaction_id: str
    label: int
    known: float
    """Epoch seconds at which it becomes known."""
    source: str
    typology: str | None = None
    """The fraud's typology (the labels table's ``typology``), on fraud labels only."""


def fraud_delay_days(episode: str) -> float:
    """The chargeback delay of ``episode`` (the same on every run: seeded by its id)."""
    return random.Random(episode).uniform(*FRAUD_DELAY_DAYS)


def late_label(item: Labelled) -> LateLabel:
    """When and how the label of ``item`` becomes known."""
    t = item.tx.timestamp.timestamp()
    if item.fraud:
        episode = item.episode or item.tx.transaction_id
        return LateLabel(item.tx.transaction_id, 1, t + fraud_delay_days(episode) * _DAY,
                         f"{SOURCE_FRAUD}:{item.typology or 'other'}:{episode}",
                         item.typology or "other")
    return LateLabel(item.tx.transaction_id, 0, t + SETTLED_DAYS * _DAY, SOURCE_GENUINE)


def parse_source(source: str) -> tuple[str, str] | None:
    """(typology, episode id) of a demo fraud label's source, else None."""
    kind, _, rest = source.partition(":")
    typology, _, episode = rest.partition(":")
    return (typology, episode) if kind == SOURCE_FRAUD and episode else None


def known_between(world: World, after: float, upto: float) -> list[LateLabel]:
    """The labels of ``world`` that become known in ``(after, upto]`` (epoch seconds)."""
    first = after - max(FRAUD_DELAY_DAYS[1], SETTLED_DAYS) * _DAY
    last = upto - min(FRAUD_DELAY_DAYS[0], SETTLED_DAYS) * _DAY
    if last <= first:
        return []
    out = []
    for item in events_between(world, datetime.fromtimestamp(first, timezone.utc),
                               datetime.fromtimestamp(last, timezone.utc)):
        label = late_label(item)
        if after < label.known <= upto:
            out.append(label)
    out.sort(key=lambda lab: lab.known)
    return out


def write_labels_file(path: Path, labels: Iterable[LateLabel]) -> int:
    """Write ``labels`` as a gzipped labels CSV that ``branchguard labels import`` reads."""
    n = 0
    with gzip.open(path, "wt", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("transaction_id", "label", "known_at", "source", "typology"))
        for lab in labels:
            writer.writerow((lab.transaction_id, lab.label, rfc3339(lab.known), lab.source,
                             lab.typology or ""))
            n += 1
    return n


def deliver(db_path: Path, directory: Path, world: World, after: float, upto: float
            ) -> ImportResult | None:
    """Write the labels known in ``(after, upto]`` to a file in ``directory`` and import it
    (None when there were none). The import is idempotent: delivering a period twice
    changes nothing."""
    labels = known_between(world, after, upto)
    if not labels:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(upto, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"labels-{stamp}.csv.gz"
    write_labels_file(path, labels)
    result = import_labels(db_path, path)
    log.info("demo.labels_delivered", txn_id=None, file=str(path), rows=result.rows,
             imported=result.imported, frauds=result.frauds)
    return result
