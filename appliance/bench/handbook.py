"""The Fraud Detection Handbook protocol, run through the real appliance.

On the handbook's simulated transactions (days 46-66 in ``../shared/data``), in a throwaway
data directory, with an embedded nats-server and the real
:class:`~appliance.scoring.pipeline.Scorer` (registry watched, so promotions hot-swap):

1. replay days 46-59 as terminals would publish them (history: features and stored verdicts,
   scored by the shipped model);
2. import the labels of days ``label_first_day``-``label_last_day`` (default 46-52) as known
   ``label_delay_days`` (default 7) after each transaction;
3. ``retrain`` unsupervised (an Isolation Forest whose features are chosen by time-ordered
   validation inside its window; labels known by then only choose them and judge promotion),
   then ``retrain --supervised`` (the LightGBM challenger, tuned the same way, its training and
   validation rows' label features as served: each label from its own known_at); each is
   promoted only by the promotion rule;
4. wait until the scorer serves the production model, replay days 60-66;
5. evaluate days 60-66 against their labels (taken from the CSV, never imported, so they
   cannot leak): the stored live verdicts, and a backtest of every model on the same
   transactions.

Handbook day ``d`` is the UTC day ``2018-04-01 + d``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from .. import logs
from ..feed.replay import replay_csv
from ..feed.simulate import Labelled
from ..feed.terminal import publish
from ..learning.backtest import backtest, label_state, load_rows
from ..learning.evaluation import DAY, Metric, Scored, evaluate, format_table
from ..learning.retrain import RetrainResult, retrain
from ..operations.node import EmbeddedNats
from ..scoring.ingest import connect
from ..scoring.labels import import_labels, write_label_file
from ..scoring.pipeline import Scorer
from ..scoring.registry import Registry
from ..settings import Settings
from ..store import Store

log = logs.get("appliance.handbook")
DAY0 = datetime(2018, 4, 1, tzinfo=timezone.utc).timestamp()


def day_of(item: Labelled) -> int:
    return int((item.tx.timestamp.timestamp() - DAY0) // DAY)


@dataclass(frozen=True)
class HandbookReport:
    table: str
    rows: list[tuple[str, dict[str, Metric]]]
    retrains: list[RetrainResult]
    live_models: list[str]
    seconds: float


async def _replay(scorer: Scorer, store: Store, url: str, items: Sequence[Labelled],
                  branch: str) -> None:
    nc = await connect(url, "handbook-terminals")
    try:
        before = store.counts()["transactions"]
        await publish(nc, [i.tx for i in items], branch=branch)
    finally:
        await nc.drain()
    deadline = time.monotonic() + 600
    while store.counts()["transactions"] < before + len(items):
        if time.monotonic() > deadline:
            raise TimeoutError("the scorer did not store the replayed transactions")
        await asyncio.sleep(0.2)


async def _wait_for_model(scorer: Scorer, registry: Registry, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while scorer.model.version != registry.production():
        if time.monotonic() > deadline:
            raise TimeoutError("the scorer did not switch to the production model")
        await asyncio.sleep(0.1)


async def _run(settings: Settings, items: list[Labelled], label_days: tuple[int, int],
               label_delay_days: float, training_label_delay_days: float | None,
               ) -> tuple[list[RetrainResult], dict[str, bool]]:
    history = [i for i in items if 46 <= day_of(i) <= 59]
    test = [i for i in items if 60 <= day_of(i) <= 66]
    server = EmbeddedNats(settings)
    url = server.start()
    store = Store.open(settings.db_path)
    registry = Registry.of(settings)
    nc = await connect(url, "handbook-scorer")
    scorer = Scorer(nc, store, registry.load(registry.production()), settings, registry)
    task = asyncio.create_task(scorer.run())
    retrains: list[RetrainResult] = []
    try:
        await scorer.ready.wait()
        await _replay(scorer, store, url, history, settings.branch)
        log.info("handbook.history_stored", txn_id=None, rows=len(history))
        labels_file = settings.data_dir / "labels-known-later.csv"
        first, last = label_days
        write_label_file(labels_file, [
            (i.tx.transaction_id, int(i.fraud), i.tx.timestamp.timestamp()
             + label_delay_days * DAY) for i in history if first <= day_of(i) <= last],
            source="handbook-delayed")
        import_labels(settings.db_path, labels_file)
        loop = asyncio.get_running_loop()
        # No features are given: each retrain chooses its forest's features by time-ordered
        # validation inside its window (learning/validation.py), as a node does.
        retrains.append(await loop.run_in_executor(None, lambda: retrain(settings)))
        retrains.append(await loop.run_in_executor(None, lambda: retrain(
            settings, supervised=True,
            training_label_delay_days=training_label_delay_days)))
        await _wait_for_model(scorer, registry)
        await _replay(scorer, store, url, test, settings.branch)
    finally:
        scorer.stop()
        try:
            await asyncio.wait_for(task, 60)
        finally:
            await nc.drain()
            store.close()
            server.stop()
    return retrains, {i.tx.transaction_id: i.fraud for i in test}


def run_handbook(settings: Settings, csv_path: Path, *, label_days: tuple[int, int] = (46, 52),
                 label_delay_days: float = 7.0, training_label_delay_days: float | None = None,
                 k: int = 100, resamples: int = 200) -> HandbookReport:
    """Run the protocol in ``settings.data_dir`` (which should be empty); see the module
    docstring. Returns the table (Markdown) and what it is made of."""
    started = time.monotonic()
    # The handbook's transactions are from 2018: history, loaded with the event-time window
    # off, as docs/transactions.md says history is loaded.
    settings = replace(settings, nats_url=None, nats_port=0, model_check_seconds=0.5,
                       label_refresh_seconds=1.0, event_time_check=False)
    items = list(replay_csv(csv_path, branch=settings.branch, sort_by_time=True))
    retrains, truth = asyncio.run(_run(settings, items, label_days, label_delay_days,
                                       training_label_delay_days))
    rows = load_rows(settings.db_path, since=DAY0 + 60 * DAY, until=DAY0 + 67 * DAY)
    ts = rows.ts
    accounts = [tx.account_id for tx in rows.txs]
    y = [truth[tx.transaction_id] for tx in rows.txs]
    budget = int(settings.alert_budget_per_day)
    live = sorted(set(rows.model_version))
    table_rows = [(f"live verdicts ({', '.join(live)})",
                   evaluate(Scored.of(ts, accounts, rows.risk, rows.alert, y), k=k,
                            budget=budget, resamples=resamples))]
    registry = Registry.of(settings)
    labels = label_state(settings.db_path)
    for version in [settings.model_version, *(r.version for r in retrains)]:
        model = registry.load(version)
        risk, alert = backtest(rows, model, labels, settings)
        kind = "supervised, labels" if model.uses_labels else "unsupervised, no labels"
        table_rows.append((f"{version} ({kind}, {registry.stage(version)})",
                           evaluate(Scored.of(ts, accounts, risk, alert, y), k=k,
                                    budget=budget, resamples=resamples)))
    table = format_table(table_rows, k=k, budget=budget)
    return HandbookReport(table, table_rows, retrains, live, time.monotonic() - started)
