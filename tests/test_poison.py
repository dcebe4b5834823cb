"""A transaction whose scoring raises is dead-lettered; the rest of its batch is scored exactly
as if it had never been sent, and the node keeps running."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest

from appliance.feed.terminal import publish
from appliance.scoring import batch
from appliance.scoring.features import compute_all
from appliance.scoring.model import Model
from appliance.scoring.pipeline import Scorer
from appliance.settings import Settings
from appliance.store import Store, decode_features

from .support import make_transactions, query, read_stream


def test_a_poisonous_transaction_is_dead_lettered_and_the_batch_goes_on(
        settings: Settings, nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    txs = [item.tx for item in make_transactions(60, seed=9)]
    poison = txs[25].transaction_id
    real_judge = batch.judge

    def judge(tx, *args, **kwargs):  # type: ignore[no-untyped-def]
        if tx.transaction_id == poison:
            raise ValueError("cannot judge this one")
        return real_judge(tx, *args, **kwargs)

    monkeypatch.setattr(batch, "judge", judge)  # scoring/batch.py decides every verdict

    async def run() -> None:
        nc = await nats.connect(nats_url)
        feed = await nats.connect(nats_url)
        store = Store.open(settings.db_path)
        scorer = Scorer(nc, store, Model.load(settings.models_dir, settings.model_version),
                        settings)
        task = asyncio.create_task(scorer.run())
        await scorer.ready.wait()
        await publish(feed, txs, branch="BR001")
        for _ in range(200):
            if scorer.counters.transactions + scorer.counters.dead_letters >= len(txs):
                break
            await asyncio.sleep(0.05)
        scorer.stop()
        await task
        store.close()
        await nc.drain()
        await feed.drain()

    asyncio.run(run())
    db = settings.db_path
    stored = query(db, "SELECT transaction_id, features FROM transactions ORDER BY stream_seq")
    assert [r[0] for r in stored] == [t.transaction_id for t in txs if t.transaction_id != poison]
    clean = compute_all(t for t in txs if t.transaction_id != poison)
    assert [tuple(decode_features(r[1])) for r in stored] == [tuple(f) for f in clean]
    (reason,) = query(db, "SELECT reason FROM dead_letters")[0]
    assert reason == "scoring failed: ValueError: cannot judge this one"
    dlq = read_stream(nats_url, "TX_DLQ", expect=1)
    assert [msgspec.json.decode(m.data)["transaction_id"] for m in dlq] == [poison]
    assert query(db, "SELECT stream_seq FROM checkpoints")[0][0] == len(txs)
