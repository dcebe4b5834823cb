"""The writer thread's groups (scoring/commit.py): a backlog is committed in large groups,
which share the index pages their rows dirty; a quiet stream is committed at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from appliance.scoring.commit import GroupCommit
from appliance.store import Store

from .support import approved_rows, make_transactions


def test_a_full_batch_waits_for_what_follows_it_and_a_small_one_does_not(
        tmp_path: Path) -> None:
    txs = [item.tx for item in make_transactions(130, seed=8)]
    store = Store.open(tmp_path / "branchguard.db")

    async def run() -> tuple[int, int, int]:
        writer = GroupCommit(store, "scorer", max_rows=110, max_wait=0.02, busy_rows=100,
                             busy_wait=30.0)
        writer.start()
        # a full batch (a backlog): the next batch, 0.2 s later, joins its group
        full = writer.submit(approved_rows(txs[:100], 1), [], 100, 0, 0)
        await asyncio.sleep(0.2)
        assert not full.done()  # still gathering
        follows = writer.submit(approved_rows(txs[100:110], 101), [], 110, 0, 0)  # max_rows
        await asyncio.wait_for(asyncio.gather(full, follows), 10)
        busy = writer.commits
        # a small batch (a quiet stream) is committed without waiting for more
        small = writer.submit(approved_rows(txs[110:120], 111), [], 120, 0, 0)
        await asyncio.wait_for(small, 10)  # far less than busy_wait
        quiet = writer.commits - busy
        await asyncio.sleep(0.1)
        writer.submit(approved_rows(txs[120:130], 121), [], 130, 0, 0)
        await writer.stop()
        return busy, quiet, writer.commits

    try:
        busy, quiet, commits = asyncio.run(run())
        assert store.counts()["transactions"] == 130
        assert store.checkpoint("scorer") == 130
    finally:
        store.close()
    assert busy == 1
    assert quiet == 1
    assert commits == 3
