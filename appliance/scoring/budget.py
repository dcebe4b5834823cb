"""The alert budget: model-driven alerts kept near what the fraud team can review a day.

The team says how many alerts a day it can work (``alert_budget_per_day``). Rules it chose
(the deny list, amounts over the limit, typology rules: *hard* hits) always alert. The model's
signal is different: it ranks transactions by how unusual they are, and any fixed threshold
on that rank raises as many alerts as the traffic and the model happen to give. So the
model's threshold is not fixed; it is the risk that the budget's share of the recent
transactions exceeds.

How (docs/scoring.md, "The alert budget"):

- **The distribution** is a histogram of risk (``BINS`` equal bins over [0, 1]) per hour of
  *event time*, over the last ``alert_budget_window_days``; each hour's counts leave the
  window whole. Only *eligible* transactions go in: not hard, and from an account with at
  least ``alert_budget_min_history`` earlier transactions (the model cannot judge a card
  with no past, see below). The risk counted is the one the budget ranks: the model's risk
  combined (noisy-OR) with the risk of any soft rule hit.
- **The threshold**: the window spans ``span`` days of event time (shorter at first), in
  which the team could work ``alert_budget_per_day × span`` alerts; hard alerts in the
  window take their part of that (the model keeps at least ``MODEL_SHARE_FLOOR`` of it).
  The WARNING threshold is the lowest bin whose count at or above it fits in what is left;
  HIGH and CRITICAL are the same for ``alert_budget_high_share`` and
  ``alert_budget_critical_share`` of it. Each threshold is kept incrementally (one bin
  index and the count above it), so a transaction costs a bin increment and a few
  comparisons, never a sort or a scan.
- **Floors**: no model alert below ``alert_budget_min_risk``; no model-only CRITICAL (a
  decline) below ``critical_risk``. Until ``alert_budget_min_samples`` eligible
  transactions are in the window and a day of event time has been seen (a cold start: a
  day's first hours are not its share), the model raises only WARNING, and only at
  ``alert_budget_cold_risk`` (and within the budget's share of the span seen).
- **No flood**: whatever the thresholds say, model alerts per hour of event time stop at
  ``alert_budget_burst`` times the budget's hourly share. A backlog replayed at full speed
  is bucketed by its own event times, so it raises the share of the span it covers.

Why event time, not wall time: the budget is about days of the bank's business; a backlog
of six hours replayed in a minute holds six hours of transactions and gets six hours'
share, where a wall-clock budget would give the whole minute's share to its first
transactions and none to the rest. And the state is then a function of the transactions
alone, so it can be rebuilt exactly from the stored rows (:func:`rebuild`): a restarted
scorer decides as the one before it would have (a published verdict is kept anyway:
the pipeline adopts it).
"""

from __future__ import annotations

import math
import sqlite3
import struct
import time
from array import array
from pathlib import Path
from typing import Any

import msgspec

from .. import logs
from ..settings import Settings
from ..store import decode_features
from ..verdict import Severity
from .features import INDEX
from .rules import HARD_REASONS

log = logs.get("appliance.budget")

BINS = 10_000
"""Histogram bins over risk [0, 1]: a resolution of 0.0001."""
HOUR = 3600
DAY = 86400.0
MODEL_SHARE_FLOOR = 0.1
"""The model keeps at least this share of the budget however many hard alerts there are, so
that it is never silenced by a noisy rule."""
LIST_REASONS = frozenset({"allow_list", "deny_list"})
"""Added after the verdict (lists.py): the budget never saw them."""
_PRIOR = INDEX["account_prior_count"]
_PRIOR_AT = 8 * _PRIOR
_unpack_double = struct.Struct("d").unpack_from
_decode_reasons = msgspec.json.Decoder(list[str]).decode

# tier indexes into Budget.index / Budget.above
_WARNING, _HIGH, _CRITICAL = 0, 1, 2


class Budget:
    """The scorer's running risk distribution and the thresholds it gives.

    :meth:`judge` is called once per transaction in stream order; the state depends only on
    which transactions it saw (not on their order or on batches), which is what lets
    :func:`rebuild` reproduce it from the stored rows.
    """

    def __init__(self, settings: Settings) -> None:
        self.per_day = settings.alert_budget_per_day
        self.hours = max(1, round(settings.alert_budget_window_days * 24))
        self._rate = self.per_day / DAY
        """Alerts the team can work per second of event time."""
        self._high_share = settings.alert_budget_high_share
        self._critical_share = settings.alert_budget_critical_share
        self.min_samples = settings.alert_budget_min_samples
        self.min_history = settings.alert_budget_min_history
        self.min_risk = settings.alert_budget_min_risk
        self.cold_risk = settings.alert_budget_cold_risk
        self.critical_floor = settings.critical_risk
        self._warm = min(DAY, (self.hours - 1) * HOUR)
        """Event time the budget must have seen before it leaves its cold start."""
        self.cap = max(1, int(settings.alert_budget_burst * self.per_day / 24))
        """Most model alerts in one hour of event time."""

        self.clock = -math.inf
        """Newest event time seen (seconds): where the window ends."""
        self.first = math.inf
        """Oldest event time seen: the window is shorter than its length at first."""
        self.hour = -(2**62)
        """Hour (``ts // 3600``) of ``clock``: the window is hours hour-hours+1 .. hour."""
        self._start = math.inf
        """Where the window's span begins: its first hour, or ``first`` if later."""
        self.total = [0] * BINS
        """Eligible transactions per risk bin, over the window."""
        self.samples = 0
        self.hard = 0
        """Hard-hit transactions in the window."""
        self.by_hour: dict[int, array[int]] = {}
        self.hard_by_hour: dict[int, int] = {}
        self.alerts_by_hour: dict[int, int] = {}
        """Model alerts raised per hour (the burst cap)."""
        self.index = [BINS, BINS, BINS]
        """Per tier: the lowest bin whose count at or above it fits that tier's target."""
        self.above = [0, 0, 0]
        """Per tier: eligible transactions in bins >= index."""
        self._capped_hour = -1

    # --- the thresholds ---------------------------------------------------------------------

    def targets(self) -> tuple[float, float, float]:
        """How many eligible transactions of the window may be at or above each tier's
        threshold: the budget over the window's span, less the hard alerts in it (the same
        arithmetic as inline in :meth:`judge`)."""
        allowed = self._rate * (self.clock - self._start)
        if allowed < 0.0:
            allowed = 0.0
        model = allowed - self.hard
        if model < MODEL_SHARE_FLOOR * allowed:
            model = MODEL_SHARE_FLOOR * allowed
        return model, model * self._high_share, model * self._critical_share

    def threshold(self, tier: int = _WARNING) -> float:
        """Risk at or above which the budget alerts at ``tier`` (0 WARNING, 1 HIGH, 2
        CRITICAL), floors included; above 1 when it alerts at none. For people and logs."""
        if self.cold:
            return max(self.index[0] / BINS, self.cold_risk) if tier == _WARNING else math.inf
        floor = self.critical_floor if tier == _CRITICAL else self.min_risk
        return max(self.index[tier] / BINS, floor)

    @property
    def cold(self) -> bool:
        """Whether the budget still knows too little to set the threshold: fewer than
        ``min_samples`` eligible transactions, or less than a day of event time seen (the
        first hours of a day are not its share: nights are quiet, afternoons busy)."""
        return self.samples < self.min_samples or self.clock - self.first < self._warm

    def eligible(self, prior_count: float) -> bool:
        """Whether the account has enough past for the model alone to alert on it."""
        return prior_count >= self.min_history

    def _fit(self, tier: int, target: float) -> None:
        """Move tier's index to the lowest bin whose count at or above it is <= target."""
        total, i, above = self.total, self.index[tier], self.above[tier]
        while above > target:
            above -= total[i]
            i += 1
        while i > 0 and above + total[i - 1] <= target:
            i -= 1
            above += total[i]
        self.index[tier], self.above[tier] = i, above

    def _refit(self) -> None:
        for tier, target in enumerate(self.targets()):
            self._fit(tier, target)

    # --- one transaction --------------------------------------------------------------------

    def judge(self, ts: float, risk: float, hard: bool, eligible: bool) -> Severity:
        """Count one transaction and say what the budget makes of it: the severity of a model
        alert, or INFO (not eligible, hard: the caller decides those, or under the
        threshold). ``risk`` is the ranked risk (model and soft rules); ``ts`` event time.

        The hot path: a bin increment, the targets, and two comparisons per tier unless a
        threshold moves (then a step or two of :meth:`_fit`)."""
        hour = int(ts // HOUR)
        if hour > self.hour:
            self._advance(hour)
        if ts > self.clock:
            self.clock = ts
        if ts < self.first:
            self.first = ts
            self._start = max(ts, float((self.hour - self.hours + 1) * HOUR))
        in_window = hour > self.hour - self.hours
        if hard:
            if in_window:
                self.hard += 1
                self.hard_by_hour[hour] = self.hard_by_hour.get(hour, 0) + 1
            return "INFO"
        if not eligible:
            return "INFO"
        b = int(risk * BINS)
        if b >= BINS:
            b = BINS - 1
        index, above, total = self.index, self.above, self.total
        if in_window:
            counts = self.by_hour.get(hour)
            if counts is None:
                counts = self.by_hour[hour] = array("I", bytes(4 * BINS))
            counts[b] += 1
            total[b] += 1
            self.samples += 1
            if b >= index[0]:
                above[0] += 1
                if b >= index[1]:
                    above[1] += 1
                    if b >= index[2]:
                        above[2] += 1
        # the targets (see targets()), inline: this runs for every transaction
        allowed = self._rate * (self.clock - self._start)
        if allowed < 0.0:
            allowed = 0.0
        model = allowed - self.hard
        if model < MODEL_SHARE_FLOOR * allowed:
            model = MODEL_SHARE_FLOOR * allowed
        i, a = index[0], above[0]
        if a > model or (i and a + total[i - 1] <= model):
            self._fit(0, model)
        target = model * self._high_share
        i, a = index[1], above[1]
        if a > target or (i and a + total[i - 1] <= target):
            self._fit(1, target)
        target = model * self._critical_share
        i, a = index[2], above[2]
        if a > target or (i and a + total[i - 1] <= target):
            self._fit(2, target)

        if self.samples < self.min_samples or self.clock - self.first < self._warm:
            if risk < self.cold_risk or b < index[0]:
                return "INFO"
            severity: Severity = "WARNING"
        else:
            if b < index[0] or risk < self.min_risk:
                return "INFO"
            if b >= index[2] and risk >= self.critical_floor:
                severity = "CRITICAL"
            elif b >= index[1]:
                severity = "HIGH"
            else:
                severity = "WARNING"
        raised = self.alerts_by_hour.get(hour, 0)
        if raised >= self.cap:
            if hour != self._capped_hour:
                self._capped_hour = hour
                log.warning("budget.capped", txn_id=None, hour=_iso(hour), cap=self.cap,
                            **self.status())
            return "INFO"
        if in_window:
            self.alerts_by_hour[hour] = raised + 1
        return severity

    def _advance(self, hour: int) -> None:
        """The clock enters a new hour: hours that leave the window take their counts."""
        self.hour = hour
        self._start = max(self.first, float((hour - self.hours + 1) * HOUR))
        oldest = hour - self.hours
        total = self.total
        for h in [h for h in self.by_hour if h <= oldest]:
            counts = self.by_hour.pop(h)
            for b, n in enumerate(counts):
                if n:
                    total[b] -= n
                    self.samples -= n
        for h in [h for h in self.hard_by_hour if h <= oldest]:
            self.hard -= self.hard_by_hour.pop(h)
        for h in [h for h in self.alerts_by_hour if h <= oldest]:
            del self.alerts_by_hour[h]
        self.index, self.above = [BINS, BINS, BINS], [0, 0, 0]
        self._refit()
        if self.samples:
            log.info("budget.hour", txn_id=None, hour=_iso(hour), **self.status())

    def status(self) -> dict[str, Any]:
        """The budget as an operator reads it (logged each event-time hour)."""
        day = self.hour - self.hour % 24
        return {"samples": self.samples, "hard_in_window": self.hard,
                "warning_threshold": _shown(self.threshold(_WARNING)),
                "high_threshold": _shown(self.threshold(_HIGH)),
                "critical_threshold": _shown(self.threshold(_CRITICAL)),
                "model_alerts_today": sum(n for h, n in self.alerts_by_hour.items() if h >= day),
                "budget_per_day": self.per_day, "cold": self.cold}


def _shown(risk: float) -> float | None:
    return round(risk, 4) if risk <= 1.0 else None


def _iso(hour: int) -> str:
    return time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(hour * HOUR))


def is_hard(reasons: list[str]) -> bool:
    """Whether a stored verdict's reasons include a hard rule (``rules.HARD_REASONS``; the
    lists are not counted: the budget judged before them)."""
    return any(r in HARD_REASONS for r in reasons)


_PLAIN = "reasons = '[]' AND typeof(features) = 'blob'"
"""Rows SQLite can count by itself: no reason, and the prior count in a blob."""
_COUNTED = (
    f"SELECT CAST(ts / {HOUR} AS INTEGER), CAST(risk * {BINS} AS INTEGER), count(*) "  # noqa: S608
    f"FROM transactions WHERE ts >= ? AND {_PLAIN} AND substr(features, {_PRIOR_AT + 1}, 8) "
    "NOT IN")
_OTHERS = ("SELECT ts, risk, severity, reasons, features FROM transactions "  # noqa: S608
           f"WHERE ts >= ? AND NOT ({_PLAIN})")


def rebuild(db_path: Path, settings: Settings) -> Budget:
    """The budget as it stood after the last committed transaction, from the stored rows of
    the window, on a connection of its own.

    Two passes. Most rows have no reason and are eligible, or not, by their prior count
    alone: SQLite counts those per hour and bin itself (the prior count is a float64 in the
    features blob; a whole count has exactly one encoding, so "fewer than min_history" is a
    comparison of 8 bytes). The few others (reasons, JSON features of older rows) are
    classified here as :meth:`Budget.judge` did. Rows the lists changed are counted from
    their reasons: an allow- or deny-listed transaction counts as a model alert when
    ``ml_anomaly`` is among them."""
    started = time.monotonic()
    budget = Budget(settings)
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        newest, oldest = conn.execute("SELECT max(ts), min(ts) FROM transactions").fetchone()
        if newest is None:
            return budget
        budget.hour = int(newest // HOUR)
        budget.clock, budget.first = float(newest), float(oldest)
        budget._start = max(budget.first, float((budget.hour - budget.hours + 1) * HOUR))
        start = budget.hour - budget.hours + 1
        total, by_hour = budget.total, budget.by_hour
        hard_by_hour, alerts_by_hour = budget.hard_by_hour, budget.alerts_by_hour

        def count(hour: int, b: int, n: int) -> None:
            if b >= BINS:
                b = BINS - 1
            counts = by_hour.get(hour)
            if counts is None:
                counts = by_hour[hour] = array("I", bytes(4 * BINS))
            counts[b] += n
            total[b] += n

        young = [struct.pack("d", float(k)) for k in range(budget.min_history)]
        counted = f"{_COUNTED} ({', '.join('?' * len(young))}) GROUP BY 1, 2"  # noqa: S608
        for hour, b, n in conn.execute(counted, (start * HOUR - 1, *young)):
            if hour >= start:
                count(hour, b, n)
        for ts, risk, severity, reasons_json, features in conn.execute(_OTHERS,
                                                                      (start * HOUR - 1,)):
            hour = int(ts // HOUR)
            if hour < start:
                continue
            reasons = _decode_reasons(reasons_json)
            if reasons and is_hard(reasons):
                hard_by_hour[hour] = hard_by_hour.get(hour, 0) + 1
                continue
            prior = (_unpack_double(features, _PRIOR_AT)[0] if isinstance(features, bytes)
                     else decode_features(features)[_PRIOR])
            if not budget.eligible(prior):
                continue
            count(hour, int(risk * BINS), 1)
            listed = any(r in LIST_REASONS for r in reasons)
            if (severity != "INFO" and not listed) or (listed and "ml_anomaly" in reasons):
                alerts_by_hour[hour] = alerts_by_hour.get(hour, 0) + 1
    finally:
        conn.close()
    budget.samples = sum(total)
    budget.hard = sum(hard_by_hour.values())
    budget._refit()
    log.info("budget.rebuilt", txn_id=None, seconds=round(time.monotonic() - started, 3),
             **budget.status())
    return budget
