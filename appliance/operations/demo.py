"""``branchguard run --demo``: a branch's world with weeks of history, a live feed, and late
labels (docs/demo.md).

On start, before the scorer rebuilds its state:
1. the world (feed/world.py) is built for the demo rate: the rate *is* its size, customers
   making two transactions a day on average;
2. its terminals go into the terminal directory (places, for the map and impossible travel),
   and on a new node the demo's rules are deployed (:func:`deploy_demo_rules`);
3. the history it lacks is loaded fast (feed/history.py): on a new node the last
   ``history_days``; after a restart only the time since the newest stored transaction (at
   most ``history_days``), so a restart keeps its history and stores nothing twice (the
   world's days are deterministic, ids included);
4. the labels known by now are delivered (feed/late_labels.py).

Then the feed publishes the world's transactions as the clock reaches them, and every
:data:`LABEL_EVERY_SECONDS` the labels that became known since are delivered through
``labels import``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Final

from .. import logs
from ..casework.terminal_directory import Site, write_sites
from ..feed.history import HistoryLoad, load_history
from ..feed.late_labels import SOURCE_FRAUD, SOURCE_GENUINE, deliver, late_label
from ..feed.simulate import Labelled
from ..feed.world import World, build_world, customers_for_rate, events_between
from ..scoring.labels import LabelFeed, LabelState, parse_time
from ..scoring.model import Model
from ..scoring.rulebook import SHIPPED_RULES, deploy, deploy_target
from ..settings import Settings
from ..store import Store
from ..transaction import Transaction

log = logs.get("appliance.demo")

DEMO_RATE: Final = 0.25
"""Default live rate (transactions per second): a branch of 10,800 card customers, whose
28 days of history (about 600,000 transactions) load in a minute or two."""
DEMO_WORLD: Final = 18
"""The seed of the demo's world: the same customers and terminals on every start."""
DEMO_HISTORY_DAYS: Final = 28.0
"""History a new demo node starts with."""
HISTORY_ROWS_LIMIT: Final = 1_000_000
"""At most about this many transactions of history: a faster demo gets fewer days."""
DEMO_VELOCITY: Final = (4, 180)
"""The demo's velocity_burst (count, seconds), where the shipped rules say 6 within 60 s.
Chosen with ``branchguard rules test --until 2026-11-16`` on a demo node's first week of
history (2026-11-09 to 2026-11-16) by a criterion fixed beforehand: the most velocity_burst
frauds alerted, with precision at most 5 points lower and at most 10 more alerts a day than
the shipped rules, among counts 4, 5, 6 and windows 60, 180, 300, 600 s (docs/rules.md has
the figures). The world's bursts are payments 5-40 s apart, longer than a minute in all."""
DEMO_MAX_KMH: Final = 300.0
"""The demo's impossible_travel speed, where the shipped rules say 900 km/h: chosen the same
way, on the same week, among 300, 500, 700 and 900 km/h (the world's fraudsters pay
150-600 km away 10-40 minutes later)."""
DEMO_RULES_VERSION: Final = "rules-v2-demo"
LABEL_EVERY_SECONDS: Final = 600.0
"""How often the demo delivers the labels that became known."""
_DAY: Final = 86400.0


def demo_world(rate: float) -> World:
    """The demo's world at ``rate`` transactions per second."""
    return build_world(DEMO_WORLD, customers=customers_for_rate(rate))


def history_days(world: World, days: float = DEMO_HISTORY_DAYS) -> float:
    """``days``, or fewer when they would hold more than :data:`HISTORY_ROWS_LIMIT`
    transactions (at 3 tx/s, about 4 days)."""
    return min(days, HISTORY_ROWS_LIMIT / max(world.expected_daily(), 1.0))


def load_terminals(settings: Settings, world: World) -> int:
    """Put the world's terminals in the terminal directory (upserted: a restart rewrites
    the same rows)."""
    sites = [Site(tid, name, settings.branch, lat, lon) for tid, name, lat, lon in world.sites()]
    return write_sites(settings.db_path, sites, "runner:demo", "demo world").terminals


def demo_rules_text() -> str:
    """The shipped rules file with the demo's velocity_burst (:data:`DEMO_VELOCITY`),
    impossible_travel speed (:data:`DEMO_MAX_KMH`) and version."""
    text = SHIPPED_RULES.read_text(encoding="utf-8")
    head, section, rest = text.partition("[velocity_burst]\n")
    body, sep, tail = rest.partition("\n[")
    count, seconds = DEMO_VELOCITY
    body = re.sub(r"^count = \d+$", f"count = {count}", body, count=1, flags=re.M)
    body = re.sub(r"^seconds = \d+$", f"seconds = {seconds}", body, count=1, flags=re.M)
    head = re.sub(r'^version = ".*"$', f'version = "{DEMO_RULES_VERSION}"', head, count=1,
                  flags=re.M)
    tail = re.sub(r"^max_kmh = [\d.]+$", f"max_kmh = {DEMO_MAX_KMH}", tail, count=1,
                  flags=re.M)
    return head + section + body + sep + tail


def deploy_demo_rules(settings: Settings) -> bool:
    """Deploy :func:`demo_rules_text` (audited, as ``runner:demo``) unless a rules file is
    set or already deployed: a restarted demo, or one whose operator deployed rules of their
    own, keeps what it has. Returns whether it deployed. The demo shows the product's way of
    setting a rule: tried on an earlier period with ``rules test``, then deployed."""
    if settings.rules_file is not None or deploy_target(settings).exists():
        return False
    path = settings.data_dir / "demo-rules.toml"
    path.write_text(demo_rules_text(), encoding="utf-8")
    count, seconds = DEMO_VELOCITY
    deploy(settings, path, "runner:demo", f"demo: velocity_burst {count} within {seconds} s, "
           f"impossible_travel over {DEMO_MAX_KMH:g} km/h, chosen with rules test on the "
           "first week (docs/rules.md)")
    return True


def _labelled(items: Iterator[Labelled], state: LabelState) -> Iterator[Transaction]:
    """The transactions of ``items``, adding each one's late label to ``state`` as it
    passes: a lookup at time t counts only labels known by t, and those all belong to
    earlier transactions, so the history is scored with exactly the labels known then."""
    for item in items:
        lab = late_label(item)
        state.add(item.tx.account_id, item.tx.terminal_id, lab.known, lab.label)
        yield item.tx


@dataclass(frozen=True)
class DemoStart:
    """What :func:`prepare_demo` did; ``live_from`` is where the live feed begins."""

    live_from: float
    history: HistoryLoad
    labels_until: float


def _labels_until(store: Store, fallback: float) -> float:
    """The newest ``known_at`` of the demo labels delivered (``fallback`` when none)."""
    row = store.reader.execute(
        "SELECT max(known_at) FROM labels WHERE source = ? OR source LIKE ?",
        [SOURCE_GENUINE, SOURCE_FRAUD + ":%"]).fetchone()
    return fallback if row[0] is None else parse_time(row[0])


def prepare_demo(settings: Settings, store: Store, model: Model, world: World,
                 history_days: float = DEMO_HISTORY_DAYS, now: float | None = None
                 ) -> DemoStart:
    """Steps 2-4 of the module docstring; call before the scorer starts."""
    now = time.time() if now is None else now
    load_terminals(settings, world)
    deploy_demo_rules(settings)
    newest = store.newest_ts()
    floor = now - history_days * _DAY
    start = floor if newest is None else max(newest, floor)
    feed = LabelFeed(store.reader.conn)  # labels already stored (a restart's gap)
    while feed.refresh():
        pass
    items = events_between(world, datetime.fromtimestamp(start, timezone.utc),
                           datetime.fromtimestamp(now, timezone.utc))
    history = load_history(store, model, settings, _labelled(items, feed.state))
    after = _labels_until(store, floor)
    deliver(settings.db_path, settings.data_dir / "demo-labels", world, after, now)
    log.info("demo.prepared", txn_id=None, customers=world.customers,
             terminals=len(world.terminal_ids), history_from=start, live_from=now,
             history_rows=history.rows)
    return DemoStart(now, history, now)


def live_stream(world: World, after: float) -> Iterator[Transaction]:
    """The world's transactions after ``after`` (epoch seconds), endless, in time order:
    published as the clock reaches each one."""
    for item in events_between(world, datetime.fromtimestamp(after, timezone.utc)):
        yield item.tx


async def deliver_labels(settings: Settings, world: World, after: float,
                         stop: asyncio.Event, every: float = LABEL_EVERY_SECONDS) -> None:
    """Every ``every`` seconds until ``stop``: import the labels known since the last time
    (off the event loop: it regenerates the days the labels belong to)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except TimeoutError:
            pass
        upto = time.time()
        try:
            await loop.run_in_executor(None, deliver, settings.db_path,
                                       settings.data_dir / "demo-labels", world, after, upto)
        except Exception:  # noqa: BLE001 - a failed delivery is retried next time
            log.error("demo.labels_failed", exc_info=True, txn_id=None)
            continue
        after = upto
