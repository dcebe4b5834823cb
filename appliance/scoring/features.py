"""Behavioural features of one transaction, from the history *before* it.

:class:`FeatureState` holds, per account and per terminal, what the features need: exact
event-time sliding windows (1 h, 24 h, 7 d), the account's amount statistics (with every
amount in order of size, for its median), the terminals, locations and categories it has
used, and its last transaction time. :meth:`FeatureState.observe` computes the features of a
transaction and then adds it to the state: the one function used for serving, for training
and for rebuilding state from the database, so the three cannot diverge.

Contracts:
- a window of length ``w`` at event time ``t`` holds the earlier-processed transactions with
  ``t - w < ts <= t``; the state keeps 7 days behind each entity's newest event, so a late
  transaction's windows never reach further back than that;
- amounts are summed as integer thousandths, so a state rebuilt from the database in another
  order is bit-for-bit the state that was built live;
- each call is O(1) amortised for in-order events (pointers only move forward), plus a
  look at the account's last 7 days and one insertion into its amounts sorted by size (a
  bisection and a memmove of 8 bytes an earlier transaction); a late event costs
  O(log n + k) for the k events it has to step over.
"""

from __future__ import annotations

import math
import sqlite3
from array import array
from bisect import bisect_right, insort
from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import count, islice
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from sqlite_utils import Database

from ..transaction import MILLI, Transaction

WINDOWS: tuple[tuple[str, float], ...] = (("1h", 3600.0), ("24h", 86400.0), ("7d", 604800.0))
HORIZON = WINDOWS[-1][1]
_W0, _W1, _W2 = (w for _, w in WINDOWS)
"""How far behind an entity's newest event the state keeps events (seconds)."""

FEATURES: tuple[str, ...] = (
    "amount",
    "account_mean_amount",
    "amount_deviation",
    "amount_to_mean_ratio",
    "amount_zscore",
    "account_prior_count",
    *(f"account_{kind}_{name}" for name, _ in WINDOWS for kind in ("count", "sum")),
    "seconds_since_previous",
    "hour_of_day",
    "first_time_terminal",
    "first_time_location",
    "first_time_category",
    *(f"terminal_{kind}_{name}" for name, _ in WINDOWS for kind in ("count", "sum")),
    "amount_to_median_ratio",
    "account_max_7d_to_median",
    "account_large_count_7d",
    "amount_to_mean_7d_ratio",
)
"""Feature names, in the order :meth:`FeatureState.observe` returns them.

``amount_deviation`` is amount minus the account's prior mean; ``amount_to_mean_ratio`` is
amount over that mean (1 with no history); ``amount_zscore`` uses the prior sample standard
deviation (0 with fewer than 2 prior transactions); ``seconds_since_previous`` is capped at 7
days (and is 7 days with no prior transaction); ``hour_of_day`` is in the timestamp's own
offset (the terminal's local time); ``first_time_*`` are 1.0 for a terminal, location or
category the account has not used before (0.0 when the field is absent).

The last four compare with the account's *typical* amount, which a mean is a poor measure of
once a stolen card has made a few large purchases: ``amount_to_median_ratio`` is amount over
the median of all the account's earlier amounts (the upper median; 1 with no history);
``account_max_7d_to_median`` is the largest of its amounts in the last 7 days over that
median, and ``account_large_count_7d`` how many of those were at least ``LARGE_MULTIPLE``
times it (both 0 with no history): a card that has just started making large purchases
stands out before any of them is labelled. ``amount_to_mean_7d_ratio`` is amount over the
mean of the last 7 days (1 with none). On the fraud handbook's protocol they raised the served
challenger's ROC AUC from 0.869 to 0.895 and its average precision from 0.509 to 0.546
(docs/models.md; the two-forest challenger then took AP to 0.599).
"""
INDEX = {name: i for i, name in enumerate(FEATURES)}
FEATURES_VERSION = "features-v2"
"""Stored with every row: names the FEATURES list its feature vector follows. Change it
whenever FEATURES changes, and keep the old version in :data:`VERSIONS`."""
VERSIONS: dict[str, tuple[str, ...]] = {
    "features-v1": FEATURES[:FEATURES.index("amount_to_median_ratio")],
    FEATURES_VERSION: FEATURES,
}
"""The names of the values stored under each version. Every version so far is a prefix of
the next, so an older row's values are read by name; backtest.load_rows recomputes the
missing ones when a model needs them."""
LARGE_MULTIPLE = 3
"""An amount at least this many times the account's median counts as large."""


_MILLI_F: Final = float(MILLI)
"""For dividing sums of thousandths: an int over a float, never an int over an int.

Compiled by mypyc (appliance/compiled.py), ``/`` between two ints of up to 62 bits divides
their conversions to double, which rounds twice once one passes 2**53, where Python's own
division rounds once: the compiled module's features would then differ from the source's in
the last bit (an account's squared sum of thousandths passes 2**53 after about 95,000 of
spending). So :meth:`FeatureState.observe` divides an int only by a float (one conversion,
one division: the same in both, and up to 2**53 the same as int over int) or as ``Any``,
which mypyc leaves to Python. tests/test_compiled.py holds them to bit-identical features.
"""


def epoch(ts: datetime) -> float:
    """Seconds since the Unix epoch of a tz-aware timestamp."""
    return ts.timestamp()


class Windows:
    """Exact sliding-window counts and sums over one entity's recent events."""

    __slots__ = ("ts", "amounts", "lo", "sums", "now")

    def __init__(self) -> None:
        self.ts: list[float] = []
        self.amounts: list[int] = []
        self.lo = [0] * len(WINDOWS)
        self.sums = [0] * len(WINDOWS)
        self.now = -math.inf

    def observe(self, t: float, amount_milli: int) -> list[int]:
        """Return [count, sum_milli] per window for time ``t``, then add the event."""
        if t < self.now:
            return self._observe_late(t, amount_milli)
        self.append_in_order(t, amount_milli)
        before = len(self.ts) - 1
        lo, sums = self.lo, self.sums
        return [before - lo[0], sums[0] - amount_milli, before - lo[1], sums[1] - amount_milli,
                before - lo[2], sums[2] - amount_milli]

    def append_in_order(self, t: float, amount_milli: int) -> None:
        """Add an event no older than any held (also used when rebuilding)."""
        ts, amounts, lo, sums = self.ts, self.amounts, self.lo, self.sums
        self.now = t
        n = len(ts)
        # Unrolled over the three WINDOWS: this is the hottest loop of the node.
        j, acc, cutoff = lo[0], sums[0], t - _W0
        while j < n and ts[j] <= cutoff:
            acc -= amounts[j]
            j += 1
        lo[0], sums[0] = j, acc + amount_milli
        j, acc, cutoff = lo[1], sums[1], t - _W1
        while j < n and ts[j] <= cutoff:
            acc -= amounts[j]
            j += 1
        lo[1], sums[1] = j, acc + amount_milli
        j, acc, cutoff = lo[2], sums[2], t - _W2
        while j < n and ts[j] <= cutoff:
            acc -= amounts[j]
            j += 1
        lo[2], sums[2] = j, acc + amount_milli
        ts.append(t)
        amounts.append(amount_milli)
        if j > 4096 and j * 2 > n:
            self._compact()

    def settle(self) -> None:
        """Given events appended directly in time order, set the pointers and sums (and drop
        what is beyond the horizon) as :meth:`append_in_order` would have."""
        ts, amounts = self.ts, self.amounts
        if not ts:
            return
        self.now = now = ts[-1]
        keep = bisect_right(ts, now - HORIZON)
        if keep:
            del ts[:keep]
            del amounts[:keep]
        for i, (_, w) in enumerate(WINDOWS):
            j = bisect_right(ts, now - w)
            self.lo[i] = j
            self.sums[i] = sum(amounts[j:])

    def _observe_late(self, t: float, amount_milli: int) -> list[int]:
        ts, amounts = self.ts, self.amounts
        floor = bisect_right(ts, self.now - HORIZON)
        hi = bisect_right(ts, t)
        out: list[int] = []
        for _, w in WINDOWS:
            j = min(max(bisect_right(ts, t - w, 0, hi), floor), hi)
            out += (hi - j, sum(amounts[j:hi]))
        insort(ts, t)
        amounts.insert(hi, amount_milli)
        for i, (_, w) in enumerate(WINDOWS):
            if t <= self.now - w:  # lands before the window's start: shift its pointer
                self.lo[i] += 1
            else:
                self.sums[i] += amount_milli
        return out

    def _compact(self) -> None:
        cut = self.lo[-1]
        del self.ts[:cut]
        del self.amounts[:cut]
        self.lo = [j - cut for j in self.lo]

    def snapshot(self) -> list[tuple[float, int]]:
        """The events still inside the horizon, oldest first: what defines this state."""
        start = self.lo[-1]
        return list(zip(self.ts[start:], self.amounts[start:]))


class AccountState:
    __slots__ = ("sum_milli", "sumsq_milli", "sorted_milli", "terminals", "locations",
                 "categories", "windows")

    def __init__(self) -> None:
        self.sum_milli = 0
        self.sumsq_milli = 0
        self.sorted_milli = array("q")
        """Every amount so far, in order of size (8 bytes each): the median, and the count."""
        self.terminals: set[str] = set()
        self.locations: set[str] = set()
        self.categories: set[str] = set()
        self.windows = Windows()


class FeatureState:
    """Per-account and per-terminal state; in memory, rebuilt from the database at start."""

    def __init__(self) -> None:
        self.accounts: dict[str, AccountState] = {}
        self.terminals: dict[str, Windows] = {}

    def observe(self, tx: Transaction, terminal: list[int] | None = None
                ) -> tuple[float, ...]:
        """Features of ``tx`` (in :data:`FEATURES` order) from the state before it; then add it.

        Call it exactly once per accepted transaction, in processing order.

        ``terminal``, when given, is the terminal's windows before ``tx`` as
        :meth:`Windows.observe` returns them ([count, sum_milli] per window, 6 ints),
        computed elsewhere over every transaction at the terminal (the terminal stage,
        terminal_stage.py, for a scorer that sees only its partition's accounts): they are
        used as they are, and this state's own terminal windows are left untouched.
        """
        account = self.accounts.get(tx.account_id)
        if account is None:
            account = self.accounts[tx.account_id] = AccountState()

        amount = tx.amount
        milli = round(amount * MILLI)
        t = epoch(tx.timestamp)
        n = len(account.sorted_milli)
        total: Any = account.sum_milli  # Any: Python's own int division, compiled too (_MILLI_F)
        if n:
            mean: float = total / n / MILLI
            deviation = amount - mean
            ratio = amount / mean if mean > 0 else 1.0
        else:
            mean, deviation, ratio = amount, 0.0, 1.0
        if n >= 2:
            var_milli: float = (account.sumsq_milli - total * total / n) / (n - 1)
            std = math.sqrt(var_milli) / MILLI if var_milli > 0 else 0.0
            zscore = deviation / std if std > 0 else 0.0
        else:
            zscore = 0.0

        acc_w = account.windows.observe(t, milli)
        if terminal is None:
            windows_here = self.terminals.get(tx.terminal_id)
            if windows_here is None:
                windows_here = self.terminals[tx.terminal_id] = Windows()
            term_w = windows_here.observe(t, milli)
        else:
            term_w = terminal
        previous = account.windows.ts
        # the newest earlier event at or before t: for in-order events it is the one just
        # before the event we appended; for late ones, bisect.
        k = bisect_right(previous, t) - 1  # index of this event (ties: after equals)
        floor = account.windows.now - HORIZON
        gap = t - previous[k - 1] if k >= 1 and previous[k - 1] > floor else HORIZON
        since_previous = min(gap, HORIZON)
        if n and (median := account.sorted_milli[n // 2]) > 0:
            # the 7-day window before this event, as the window counts above see it (for an
            # event in order, that window's own pointer)
            windows = account.windows
            start = (windows.lo[2] if t == windows.now else
                     bisect_right(previous, t - _W2 if t - _W2 > floor else floor, 0, k))
            week = windows.amounts[start:k]
            top = max(week) if week else 0
            large_at = LARGE_MULTIPLE * median
            large = len([v for v in week if v >= large_at]) if top >= large_at else 0
            # (int over int, but one amount's thousandths: below 1e12 < 2**53, by the contract)
            to_median, max_to_median = milli / median, top / median
        else:
            to_median, max_to_median, large = 1.0, 0.0, 0
        to_mean_7d = milli * acc_w[4] / float(acc_w[5]) if acc_w[4] and acc_w[5] > 0 else 1.0

        location, category = tx.location, tx.merchant_category
        new_terminal = tx.terminal_id not in account.terminals
        new_location = location is not None and location not in account.locations
        new_category = category is not None and category not in account.categories

        account.sum_milli += milli
        account.sumsq_milli += milli * milli
        insort(account.sorted_milli, milli)
        account.terminals.add(tx.terminal_id)
        if location is not None:
            account.locations.add(location)
        if category is not None:
            account.categories.add(category)

        return (
            amount, mean, deviation, ratio, zscore, float(n),
            float(acc_w[0]), acc_w[1] / _MILLI_F, float(acc_w[2]), acc_w[3] / _MILLI_F,
            float(acc_w[4]), acc_w[5] / _MILLI_F,
            since_previous,
            float(tx.timestamp.hour),
            float(new_terminal), float(new_location), float(new_category),
            float(term_w[0]), term_w[1] / _MILLI_F, float(term_w[2]), term_w[3] / _MILLI_F,
            float(term_w[4]), term_w[5] / _MILLI_F,
            to_median, max_to_median, float(large), to_mean_7d,
        )

    def snapshot(self) -> dict[str, object]:
        """A canonical, comparable picture of the whole state (for tests and diagnostics)."""
        return {
            "accounts": {
                key: (a.sum_milli, a.sumsq_milli, a.sorted_milli.tolist(), a.windows.now,
                      sorted(a.terminals), sorted(a.locations), sorted(a.categories),
                      a.windows.snapshot())
                for key, a in sorted(self.accounts.items())
            },
            "terminals": {key: w.snapshot() for key, w in sorted(self.terminals.items())},
        }


    @classmethod
    def rebuild(cls, rows: Iterable[tuple[str, str, float, int, str | None, str | None]],
                chunk: int = 50_000) -> FeatureState:
        """State after the stored transactions ``rows``: (account_id, terminal_id, ts,
        amount_milli, location, merchant_category), sorted by (ts, processing order).

        Equal to the state built live by :meth:`observe` over the same transactions (the
        aggregates do not depend on order; windows are kept sorted by time with ties in
        processing order, both live and here), at a fraction of the cost: no features are
        computed, and the work is done a column at a time (numpy sorts, sums and slices)
        rather than a row at a time, because this is what a restart waits for.
        """
        # Each distinct value gets a code: the row number where it first appears (map() over
        # dict.setdefault runs in C). Pairs of codes are then deduplicated by numpy.
        keys: tuple[dict[str | None, int], ...] = ({}, {}, {}, {})  # account, terminal,
        columns = tuple(array("q") for _ in keys)                    # location, category
        times, millis = array("d"), array("q")
        it, seen = iter(rows), 0
        while block := list(islice(it, chunk)):
            acc, term, ts, milli, loc, cat = zip(*block)
            for key, column, values in zip(keys, columns, (acc, term, loc, cat)):
                column.extend(map(key.setdefault, values, count(seen)))
            times.extend(ts)
            millis.extend(milli)
            seen += len(block)
        state = cls()
        if not seen:
            return state
        acc_codes, term_codes, loc_codes, cat_codes = (
            np.frombuffer(c, dtype=np.int64) for c in columns)
        t_all = np.frombuffer(times, dtype=np.float64)
        m_all = np.frombuffer(millis, dtype=np.int64)
        names = [{code: value for value, code in key.items()} for key in keys]
        accounts = {code: AccountState() for code in names[0]}
        for code, ts_list, m_list in _grouped(acc_codes, t_all, m_all):
            account = accounts[code]
            account.sum_milli = sum(m_list)
            account.sumsq_milli = _sum_of_squares(m_list)
            account.sorted_milli = array("q", sorted(m_list))
            account.windows.ts, account.windows.amounts = ts_list, m_list
            account.windows.settle()
        for field, codes, name in (("terminals", term_codes, names[1]),
                                   ("locations", loc_codes, names[2]),
                                   ("categories", cat_codes, names[3])):
            for account_code, value_code in _distinct_pairs(acc_codes, codes, seen):
                value = name[value_code]
                if value is not None:
                    getattr(accounts[account_code], field).add(value)
        state.accounts = {str(names[0][code]): a for code, a in accounts.items()}
        for code, ts_list, m_list in _grouped(term_codes, t_all, m_all):
            windows = state.terminals[str(names[1][code])] = Windows()
            windows.ts, windows.amounts = ts_list, m_list
            windows.settle()
        return state


def _grouped(codes: npt.NDArray[np.int64], ts: npt.NDArray[np.float64],
             millis: npt.NDArray[np.int64]) -> Iterator[tuple[int, list[float], list[int]]]:
    """Per code: its rows' times and amounts as Python lists, in the original (time,
    processing) order, which the stable sort keeps."""
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.diff(sorted_codes, prepend=-1))
    ends = np.append(starts[1:], len(codes))
    ts_sorted, m_sorted = ts[order].tolist(), millis[order].tolist()
    for code, lo, hi in zip(sorted_codes[starts].tolist(), starts.tolist(), ends.tolist()):
        yield code, ts_sorted[lo:hi], m_sorted[lo:hi]


def _distinct_pairs(left: npt.NDArray[np.int64], right: npt.NDArray[np.int64], width: int
                    ) -> Iterator[tuple[int, int]]:
    """The distinct (left, right) code pairs; codes are row numbers below ``width``."""
    pairs = np.sort(left * width + right)
    pairs = pairs[np.diff(pairs, prepend=-1) != 0]
    return zip((pairs // width).tolist(), (pairs % width).tolist())


def _sum_of_squares(values: list[int]) -> int:
    """Exact (Python integers: squares of large amounts overflow 64 bits)."""
    return sum([v * v for v in values])


def compute_all(transactions: Iterable[Transaction]) -> list[tuple[float, ...]]:
    """Features of each transaction in order, from an empty state (training and evaluation)."""
    state = FeatureState()
    return [state.observe(tx) for tx in transactions]


def feature_state(conn: Database, before: float | None = None) -> FeatureState:
    """Feature state rebuilt from the stored transactions with ``ts < before`` (all of them
    without it), in the order the scorer's state keeps them (see FeatureState.rebuild)."""
    select = ("SELECT account_id, terminal_id, ts, amount_milli, location, merchant_category "
              "FROM transactions ")
    cursor = (conn.execute(select + "ORDER BY ts, rowid") if before is None else
              conn.execute(select + "WHERE ts < ? ORDER BY ts, rowid", [before]))
    return FeatureState.rebuild(_iter_cursor(cursor))


def _iter_cursor(cursor: sqlite3.Cursor) -> Iterator[Any]:
    cursor.arraysize = 10000
    while True:
        rows = cursor.fetchmany()
        if not rows:
            return
        yield from rows
