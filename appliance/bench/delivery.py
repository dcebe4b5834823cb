"""The loss/duplicate check: every transaction a benchmark published is in the ``TX`` stream
exactly once, stored exactly once and has exactly one verdict in ``VERDICTS``.

Reading the ids is separate from judging them (:func:`check_delivery` takes plain lists),
so the judging can be tested on fabricated ids: a check that cannot report a loss proves
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy

from ..operations.partition_state import checkpoint_of
from ..scoring.streams import API_TIMEOUT_SECONDS, during_election
from ..settings import nats_servers


@dataclass(frozen=True)
class Place:
    """How the published ids fared in one place (the stream, the store, the verdicts)."""

    missing: int
    """Published, and not there."""
    twice: int
    """There more than once (each extra copy counts one)."""
    unexpected: int
    """There, and never published (by this run)."""
    examples: tuple[str, ...] = ()
    """A few missing or doubled ids, to look for."""


@dataclass(frozen=True)
class DeliveryCheck:
    """:func:`check_delivery`'s answer."""

    published: int
    tx_stream: Place
    stored: Place
    verdicts: Place

    @property
    def lost(self) -> int:
        """Published ids missing anywhere (each place counted)."""
        return self.tx_stream.missing + self.stored.missing + self.verdicts.missing

    @property
    def duplicated(self) -> int:
        """Extra copies anywhere."""
        return self.tx_stream.twice + self.stored.twice + self.verdicts.twice

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lost": self.lost, "duplicated": self.duplicated,
                "ok": self.ok}


def _place(published: set[str], seen: Iterable[str], examples: int) -> Place:
    counts = Counter(seen)
    missing = sorted(published - counts.keys())
    twice = sorted(i for i, n in counts.items() if n > 1 and i in published)
    return Place(missing=len(missing),
                 twice=sum(counts[i] - 1 for i in twice),
                 unexpected=sum(n for i, n in counts.items() if i not in published),
                 examples=tuple((missing + twice)[:examples]))


def check_delivery(published: Iterable[str], in_stream: Iterable[str], stored: Iterable[str],
                   verdicts: Iterable[str], examples: int = 5) -> DeliveryCheck:
    """Judge the ids found in each place against the ids published (re-sends of one id
    count once: the publisher retries under the same ``Nats-Msg-Id``)."""
    wanted = set(published)
    return DeliveryCheck(published=len(wanted),
                         tx_stream=_place(wanted, in_stream, examples),
                         stored=_place(wanted, stored, examples),
                         verdicts=_place(wanted, verdicts, examples))


async def quiet_errors(exc: Exception) -> None:
    """A server of the list may be down (a benchmark killed it): no traceback for that."""


def stream_ids(url: str, stream: str, timeout: float = 10.0) -> list[str]:
    """Every message's ``Nats-Msg-Id`` in ``stream`` (the whole stream, read once through an
    ordered consumer), in stream order; ``url`` may name several servers, some of them
    down. The stream's info is asked for through a cluster's election as the scorer asks
    (streams.during_election); ``timeout`` bounds the wait for each message."""
    async def read() -> list[str]:
        nc = await nats.connect(nats_servers(url), error_cb=quiet_errors, connect_timeout=1)
        try:
            js = nc.jetstream(timeout=API_TIMEOUT_SECONDS)
            state = (await during_election(lambda: js.stream_info(stream), "stream_info")).state
            ids: list[str] = []
            if state.messages == 0:
                return ids
            seq, stalls = 0, 0
            while seq < state.last_seq:  # a consumer stalled by a server's death: start anew
                config = (ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                         opt_start_seq=seq + 1) if seq else None)
                sub = await during_election(lambda: js.subscribe(
                    ">", stream=stream, ordered_consumer=True, config=config), "subscribe")
                try:
                    while seq < state.last_seq:
                        msg = await sub.next_msg(timeout=timeout)
                        seq = msg.metadata.sequence.stream
                        ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))
                except (NatsError, TimeoutError):
                    stalls += 1
                    if stalls > 3:
                        raise
                finally:
                    with contextlib.suppress(NatsError):
                        await sub.unsubscribe()
            return ids
        finally:
            await nc.close()
    return asyncio.run(read())


def stored_ids(db: Path) -> list[str]:
    """Every stored transaction's id (read-only; the scorer may still be running)."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        return [str(r[0]) for r in conn.execute("SELECT transaction_id FROM transactions")]
    finally:
        conn.close()


def checkpoint(db: Path, consumer: str = "scorer") -> int:
    """The consumer's last committed stream sequence (0 before its first commit, or while
    the database does not exist yet)."""
    return checkpoint_of(db, consumer)