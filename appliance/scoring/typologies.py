"""The six fraud typologies a fraud team recognises, and the per-account state they read.

Each typology's parameters come from the rules file (rulebook.py; docs/rules.md):

- ``velocity_burst``: ``count`` transactions of one account within ``seconds``;
- ``card_testing``: ``small_count`` amounts of at most ``small_amount``, or ``declines``
  earlier transactions the node itself declined, within ``seconds``;
- ``amount_spike``: an amount ``multiple`` times the largest the account ever paid, once it
  has ``min_history`` earlier transactions;
- ``impossible_travel``: from the account's previous transaction at a placed terminal (the
  terminal directory's latitude and longitude; online terminals have none) to this one,
  faster than ``max_kmh`` over at least ``min_km``;
- ``atm_cashout``: withdrawals at ``terminals`` different ATMs within ``seconds``;
- ``new_terminal_large``: the account's first use of a terminal with an amount at least
  ``multiple`` times its median and at least ``min_amount``.

Every hit is hard (it alerts whatever the alert budget) and its detail says, in words a
fraud analyst checks, the amounts, counts, places and the threshold.

State (:class:`Trail`, one per account) is the last day of the account's transaction times,
small-amount times, times of the node's declines, the ATMs it used, its last placed
transaction and its largest amount. :meth:`TypologyState.check` reads it (the state before
the transaction) and :meth:`TypologyState.decided` adds the transaction with its verdict, so
a transaction that failed to score leaves no trace. Each call is O(1) amortised for
in-order events (an index into a sorted list; a bisection only when a rule fires or for a
late event), plus a pass over the ATMs of the last day for an ATM withdrawal. At start the
state is rebuilt from the stored rows of the last day (:meth:`TypologyState.rebuild`) and
the largest amounts from the feature state; rebuilt and live states answer every check the
same (``snapshot`` compares them). One exception, bounded by a crash: a replayed transaction
that adopts the verdict published before the crash (pipeline.py) counts in the live trail
with the decision it was scored again with, until the next restart reads the stored one.
"""

from __future__ import annotations

import math
import sqlite3
import time
from bisect import bisect_right, insort
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .. import logs
from ..settings import Settings
from ..transaction import MILLI, Transaction
from ..verdict import Verdict
from .features import INDEX, FeatureState
from .rulebook import MAX_WINDOW_SECONDS, Rulebook, RulesError, load, rules_path
from .rules import Hit

log = logs.get("appliance.typologies")

HORIZON = MAX_WINDOW_SECONDS
"""How far behind an account's newest event its trail keeps events (seconds)."""
EARTH_KM = 6371.0088
_PRIOR = INDEX["account_prior_count"]
_TO_MEDIAN = INDEX["amount_to_median_ratio"]
_NEW_TERMINAL = INDEX["first_time_terminal"]
_TRIM_AT = 64


def km_between(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km (haversine, mean Earth radius)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_KM * math.asin(min(1.0, math.sqrt(a)))


def _add(times: list[float], t: float) -> None:
    """Add ``t`` in time order, dropping what is beyond the horizon (amortised: a prefix
    is cut once it is long or half the list)."""
    if not times or t >= times[-1]:
        times.append(t)
    else:
        insort(times, t)
    if times[0] <= times[-1] - HORIZON:
        cut = bisect_right(times, times[-1] - HORIZON)
        if cut >= _TRIM_AT or 2 * cut >= len(times):
            del times[:cut]


def _upto(times: list[float], t: float) -> int:
    """How many of ``times`` are at or before ``t`` (O(1) for an in-order event)."""
    return len(times) if not times or times[-1] <= t else bisect_right(times, t)


def _within(times: list[float], t: float, seconds: float, need: int) -> int:
    """How many of ``times`` are in ``(t - seconds, t]`` when that is at least ``need``
    (``need`` >= 1), else 0: one index for the answer no, a bisection for yes."""
    hi = _upto(times, t)
    if hi < need or times[hi - need] <= t - seconds:
        return 0
    return hi - bisect_right(times, t - seconds, 0, hi)


class Trail:
    """One account's recent history, as the typologies read it."""

    __slots__ = ("times", "small", "declines", "atms", "place", "max_milli")

    def __init__(self) -> None:
        self.times: list[float] = []
        """Event times of its transactions (the last day), sorted."""
        self.small: list[float] = []
        """Times of its small amounts (at most the rulebook's small_amount when added)."""
        self.declines: list[float] = []
        """Times of its transactions the node declined."""
        self.atms: dict[str, float] = {}
        """ATM terminal -> time of its latest withdrawal there."""
        self.place: tuple[float, float, float, str] | None = None
        """(time, latitude, longitude, terminal) of its latest transaction at a placed
        terminal."""
        self.max_milli = 0
        """Its largest amount so far, in thousandths (0: none)."""


class Places:
    """Terminal id -> (latitude, longitude) from the terminal directory (``terminals``),
    re-read every ``refresh_seconds``; terminals without a place (online) are absent."""

    def __init__(self, conn: sqlite3.Connection | None, refresh_seconds: float) -> None:
        self.conn = conn
        self.refresh_seconds = refresh_seconds
        self.places: dict[str, tuple[float, float]] = {}
        self._next = 0.0

    def refresh_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next or self.conn is None:
            return
        self._next = now + self.refresh_seconds
        try:
            rows = self.conn.execute(
                "SELECT terminal_id, latitude, longitude FROM terminals "
                "WHERE latitude IS NOT NULL AND longitude IS NOT NULL").fetchall()
        except sqlite3.OperationalError:
            return  # keep what we have; the next refresh tries again
        fresh = {t: (float(lat), float(lon)) for t, lat, lon in rows}
        if fresh != self.places:  # in place: the typology state holds this dict
            self.places.clear()
            self.places.update(fresh)


def _money(milli: float, currency: str) -> str:
    return f"{milli / MILLI:,.2f} {currency}"


def _span(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


class TypologyState:
    """Every account's :class:`Trail`, judged by ``book`` with the terminals' ``places``;
    in memory, rebuilt from the database at start.

    :meth:`check` then :meth:`decided`, once each per transaction in processing order. The
    rulebook's parameters are unpacked into one tuple when it is set (:meth:`use`): this is
    per transaction, and attribute chains cost more than the checks themselves.
    """

    def __init__(self, book: Rulebook, places: dict[str, tuple[float, float]] | None = None,
                 currency: str = "EUR") -> None:
        self.trails: dict[str, Trail] = {}
        self.places: dict[str, tuple[float, float]] = {} if places is None else places
        self.currency = currency
        self.book = book
        self._params: tuple[Any, ...] = ()
        self._small_milli = 0.0
        self._last_tx: Transaction | None = None
        self._last_t = 0.0
        self._last_trail: Trail | None = None
        """What :meth:`check` looked up for the transaction it saw last (three attributes
        rather than a tuple: no allocation per transaction)."""
        self.use(book)

    def use(self, book: Rulebook) -> None:
        """Judge with ``book`` from the next transaction on."""
        v, c, s, p, a, n = (book.velocity_burst, book.card_testing, book.amount_spike,
                            book.impossible_travel, book.atm_cashout, book.new_terminal_large)
        self.book = book
        self._params = (
            v.count - 1 if v.enabled else 0, v.seconds,
            c.enabled, c.small_amount, c.small_count - 1, c.declines, c.seconds,
            s.multiple if s.enabled else 0.0, s.min_history,
            p.enabled, a.enabled, n.min_amount if n.enabled else math.inf)
        self._small_milli = c.small_amount * MILLI

    def check(self, tx: Transaction, f: Sequence[float]) -> Sequence[Hit]:
        """The typologies ``tx`` matches, from the state before it (``f``: its features).
        Changes nothing (see :meth:`decided`). Mostly the empty tuple (nothing allocated)."""
        t = tx.timestamp.timestamp()
        trail = self.trails.get(tx.account_id)
        self._last_tx, self._last_t, self._last_trail = tx, t, trail
        if trail is None:  # nothing to compare with: a new account's first payment
            return ()
        (v_need, v_seconds, c_on, c_small, c_need, c_declines, c_seconds, s_multiple,
         s_history, p_on, a_on, n_least) = self._params
        hits: Sequence[Hit] = ()
        if v_need:
            times = trail.times
            k = len(times)
            if k >= v_need and (times[k - v_need] > t - v_seconds if times[-1] <= t
                                else _within(times, t, v_seconds, v_need)):
                hits = [*hits, self._velocity(trail, t)]
        if c_on:
            if tx.amount <= c_small and _within(trail.small, t, c_seconds, c_need):
                hits = [*hits, self._small(trail, tx, t)]
            elif trail.declines and _within(trail.declines, t, c_seconds, c_declines):
                hits = [*hits, self._declined(trail, t)]
        if s_multiple and trail.max_milli > 0 and f[_PRIOR] >= s_history \
                and tx.amount * MILLI >= s_multiple * trail.max_milli:
            hits = [*hits, self._spike(trail, tx, f)]
        if p_on and trail.place is not None:
            here = self.places.get(tx.terminal_id)
            if here is not None:
                hit = self._travel(trail.place, tx.terminal_id, here, t)
                if hit is not None:
                    hits = [*hits, hit]
        if a_on and tx.channel == "ATM" and trail.atms:
            hit = self._cashout(trail, tx.terminal_id, t)
            if hit is not None:
                hits = [*hits, hit]
        if tx.amount >= n_least and f[_NEW_TERMINAL] == 1.0:
            hit = self._new_terminal(tx, f)
            if hit is not None:
                hits = [*hits, hit]
        return hits

    # -- each typology's hit, made once it is known to fire (or, for the rarer checks, to
    #    see whether it does)

    def _velocity(self, trail: Trail, t: float) -> Hit:
        rule = self.book.velocity_burst
        n = _within(trail.times, t, rule.seconds, 1) + 1
        return Hit("velocity_burst",
                   f"{n} transactions from this account within {_span(rule.seconds)} "
                   f"(threshold: {rule.count} within {_span(rule.seconds)})", rule.risk, True)

    def _small(self, trail: Trail, tx: Transaction, t: float) -> Hit:
        card, currency = self.book.card_testing, self.currency
        n = _within(trail.small, t, card.seconds, 1) + 1
        return Hit("card_testing",
                   f"{n} small amounts of at most {card.small_amount:,.2f} {currency} within "
                   f"{_span(card.seconds)}, this one {tx.amount:,.2f} {currency} "
                   f"(threshold: {card.small_count})", card.risk, True)

    def _declined(self, trail: Trail, t: float) -> Hit:
        card = self.book.card_testing
        n = _within(trail.declines, t, card.seconds, 1)
        return Hit("card_testing",
                   f"{n} earlier transactions of this account declined within "
                   f"{_span(card.seconds)} (threshold: {card.declines})", card.risk, True)

    def _spike(self, trail: Trail, tx: Transaction, f: Sequence[float]) -> Hit:
        spike, currency, top = self.book.amount_spike, self.currency, trail.max_milli
        return Hit("amount_spike",
                   f"amount {tx.amount:,.2f} {currency} is {tx.amount * MILLI / top:.1f}x "
                   f"the largest this account paid before ({_money(top, currency)}, over "
                   f"{int(f[_PRIOR])} earlier transactions; threshold: {spike.multiple:g}x)",
                   spike.risk, True)

    def _travel(self, place: tuple[float, float, float, str], terminal: str,
                here: tuple[float, float], t: float) -> Hit | None:
        then, lat, lon, where = place
        if where == terminal or not t - HORIZON < then <= t:
            return None
        travel = self.book.impossible_travel
        km = km_between(lat, lon, here[0], here[1])
        hours = (t - then) / 3600.0
        if km < travel.min_km or km <= travel.max_kmh * hours:
            return None
        speed = f"{km / hours:,.0f} km/h" if hours > 0 else "no time at all"
        return Hit("impossible_travel",
                   f"{km:,.0f} km from terminal {where} to terminal {terminal} in "
                   f"{_span(round(t - then))}: {speed} (threshold: {travel.max_kmh:,.0f} "
                   "km/h)", travel.risk, True)

    def _cashout(self, trail: Trail, terminal: str, t: float) -> Hit | None:
        atm = self.book.atm_cashout
        since = t - atm.seconds
        used = sorted(term for term, last in trail.atms.items()
                      if since < last <= t and term != terminal)
        if len(used) + 1 < atm.terminals:
            return None
        shown = ", ".join(used[:5]) + (", ..." if len(used) > 5 else "")
        return Hit("atm_cashout",
                   f"cash at {len(used) + 1} different ATMs within {_span(atm.seconds)}: "
                   f"{terminal} after {shown} (threshold: {atm.terminals})", atm.risk, True)

    def _new_terminal(self, tx: Transaction, f: Sequence[float]) -> Hit | None:
        large, currency = self.book.new_terminal_large, self.currency
        ratio = f[_TO_MEDIAN]
        if f[_PRIOR] < large.min_history or tx.amount < large.min_amount \
                or ratio < large.multiple:
            return None
        return Hit("new_terminal_large",
                   f"first use of terminal {tx.terminal_id} by this account, amount "
                   f"{tx.amount:,.2f} {currency} is {ratio:.1f}x its usual "
                   f"{tx.amount / ratio:,.2f} {currency} (its median; threshold: "
                   f"{large.multiple:g}x and at least {large.min_amount:,.2f} {currency})",
                   large.risk, True)

    def decided(self, tx: Transaction, verdict: Verdict) -> Verdict:
        """Add ``tx``, scored ``verdict``, to its account's trail; returns ``verdict``."""
        if self._last_tx is tx:  # what check() just looked up
            t, trail = self._last_t, self._last_trail
            self._last_tx = None
        else:
            t, trail = tx.timestamp.timestamp(), self.trails.get(tx.account_id)
        if trail is None:
            trail = self.trails[tx.account_id] = Trail()
        times, milli = trail.times, round(tx.amount * MILLI)
        if (times and (t < times[-1] or times[0] <= t - HORIZON) or milli <= self._small_milli
                or tx.channel == "ATM" or verdict.decision == "decline"):
            self._add(trail, tx.terminal_id, t, milli, tx.channel, verdict.decision)
            return verdict
        times.append(t)  # the common case, inline: what _add does for it
        here = self.places.get(tx.terminal_id)
        if here is not None and (trail.place is None or trail.place[0] <= t):
            trail.place = (t, here[0], here[1], tx.terminal_id)
        if milli > trail.max_milli:
            trail.max_milli = milli
        return verdict

    def add(self, account: str, terminal: str, t: float, milli: float, channel: str,
            decision: str) -> None:
        """Add one transaction (what :meth:`decided` and :meth:`rebuild` share)."""
        trail = self.trails.get(account)
        if trail is None:
            trail = self.trails[account] = Trail()
        self._add(trail, terminal, t, milli, channel, decision)

    def _add(self, trail: Trail, terminal: str, t: float, milli: float, channel: str,
             decision: str) -> None:
        times = trail.times
        if times and (t < times[-1] or times[0] <= t - HORIZON):
            _add(times, t)
        else:
            times.append(t)
        if milli <= self._small_milli:
            _add(trail.small, t)
        if decision == "decline":
            _add(trail.declines, t)
        if channel == "ATM":
            atms = trail.atms
            if atms.get(terminal, -math.inf) < t:
                atms[terminal] = t
                if len(atms) > _TRIM_AT:
                    cutoff = t - HORIZON
                    trail.atms = {k: v for k, v in atms.items() if v > cutoff}
        here = self.places.get(terminal)
        if here is not None and (trail.place is None or trail.place[0] <= t):
            trail.place = (t, here[0], here[1], terminal)
        if milli > trail.max_milli:
            trail.max_milli = int(milli)

    def rebuild(self, rows: Iterable[tuple[str, str, float, int, str, str]],
                maxima: dict[str, int]) -> None:
        """The state after the stored ``rows`` (account_id, terminal_id, ts, amount_milli,
        channel, decision) of the last day, in (ts, processing) order, with each account's
        largest amount ever from ``maxima`` (the feature state's)."""
        for account, terminal, t, milli, channel, decision in rows:
            self.add(account, terminal, t, milli, channel, decision)
        for account, top in maxima.items():
            trail = self.trails.get(account)
            if trail is None:
                trail = self.trails[account] = Trail()
            trail.max_milli = max(trail.max_milli, top)

    def snapshot(self, now: float) -> dict[str, object]:
        """What defines the state for events from ``now`` on (a canonical picture, for
        tests): the trails' events within the horizon before ``now``."""
        cutoff = now - HORIZON

        def recent(times: list[float]) -> list[float]:
            return [x for x in times if x > cutoff]

        return {key: (recent(tr.times), recent(tr.small), recent(tr.declines),
                      sorted((k, v) for k, v in tr.atms.items() if v > cutoff),
                      tr.place if tr.place is not None and tr.place[0] > cutoff else None,
                      tr.max_milli)
                for key, tr in sorted(self.trails.items())}


_RECENT = ("SELECT account_id, terminal_id, ts, amount_milli, channel, decision "
           "FROM transactions WHERE ts > ? ORDER BY ts, rowid")


def stored_recent(conn: sqlite3.Connection) -> Iterable[Any]:
    """The stored rows a rebuilt state needs: the last day before the newest."""
    (newest,) = conn.execute("SELECT MAX(ts) FROM transactions").fetchone()
    if newest is None:
        return []
    cursor = conn.execute(_RECENT, (newest - HORIZON,))
    cursor.arraysize = 10000
    return cursor


def maxima_of(state: FeatureState) -> dict[str, int]:
    """Each account's largest amount (thousandths) from the feature state."""
    return {key: a.sorted_milli[-1] for key, a in state.accounts.items()
            if len(a.sorted_milli)}


class Typologies:
    """The scorer's typology rules: the rules file in force, the terminals' places and the
    accounts' trails. Re-reads the rules file when it changes (checked every
    ``model_check_seconds``) and the places every ``terminals_refresh_seconds``, both from
    :meth:`refresh_if_due`, which the scorer calls before each batch: a batch is judged by
    one rules file, whose version each of its verdicts names."""

    def __init__(self, conn: sqlite3.Connection | None, settings: Settings,
                 book: Rulebook | None = None) -> None:
        self.settings = settings
        self.path = rules_path(settings)
        self.book = book if book is not None else load(self.path)
        self._stamp = _stamp(self.path)
        self.places = Places(conn, settings.terminals_refresh_seconds)
        self.state = TypologyState(self.book, self.places.places, settings.currency)
        self._next_check = time.monotonic() + settings.model_check_seconds

    @property
    def version(self) -> str:
        return self.book.version

    def rebuild(self, conn: sqlite3.Connection, features: FeatureState) -> None:
        """The trails from the stored rows (see TypologyState.rebuild)."""
        self.places.refresh_if_due()
        self.state = TypologyState(self.book, self.places.places, self.settings.currency)
        self.state.rebuild(stored_recent(conn), maxima_of(features))

    def refresh_if_due(self) -> None:
        """Re-read the places and, when its file changed, the rules (between batches)."""
        self.places.refresh_if_due()
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.settings.model_check_seconds
        path = rules_path(self.settings)
        stamp = _stamp(path)
        if path == self.path and stamp == self._stamp:
            return
        self.path, self._stamp = path, stamp
        try:
            book = load(path)
        except RulesError as exc:
            log.error("rules.reload_failed", txn_id=None, path=str(path), error=str(exc),
                      serving=self.book.version)
            return
        if book.sha256 != self.book.sha256:
            previous, self.book = self.book.version, book
            self.state.use(book)
            log.info("rules.swapped", txn_id=None, previous=previous, version=book.version,
                     path=str(path))

    @property
    def check(self) -> Callable[[Transaction, Sequence[float]], Sequence[Hit]]:
        """The state's :meth:`TypologyState.check` (bound: the scorer takes it per batch)."""
        return self.state.check

    @property
    def decided(self) -> Callable[[Transaction, Verdict], Verdict]:
        """The state's :meth:`TypologyState.decided`."""
        return self.state.decided


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)

