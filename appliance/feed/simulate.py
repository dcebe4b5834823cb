"""Synthetic branch card traffic with labelled fraud, and replay of public CSV data sets.

Why this exists: the scorer must be exercised (tests, benchmarks, demos) on traffic that looks
like a branch's, with fraud whose *only* tell is behaviour. The reference system's data set
leaks its labels through the number of decimals of the amount, so a model trained on it learns
formatting, not fraud. Everything here therefore emits fraud and legitimate transactions
through the same code paths: same id patterns, same fields, amounts always rounded to cents.

Labels never travel inside a :class:`~appliance.transaction.Transaction` (a terminal does not
know whether it is being defrauded); they ride alongside in :class:`Labelled` and are written
to a separate file by :func:`write_labels`.

Everything is pure and deterministic for a given seed and library version (numpy's
``Generator`` streams are only guaranteed stable within a numpy release). No NATS code lives
here; publishers consume the iterators.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from ..errors import SettingsError
from ..transaction import Channel, Transaction, require_identifier

__all__ = ["TYPOLOGIES", "TYPOLOGY_SHARES", "Labelled", "simulate", "span_bound"]

UTC: Final = timezone.utc

TYPOLOGIES: Final = (
    "stolen_card",
    "compromised_terminal",
    "card_testing",
    "account_takeover",
    "risky_category",
)
"""Fraud typologies the generator injects, in a fixed order (part of the determinism)."""

TYPOLOGY_SHARES: Final[dict[str, float]] = {name: 0.2 for name in TYPOLOGIES}
"""Fraction of all fraud transactions per typology. Equal shares keep every typology
represented in small benchmark runs instead of letting one dominate the score."""


class Labelled(msgspec.Struct, frozen=True):
    """A transaction together with its ground truth, kept apart so the label cannot leak.

    ``typology`` names the fraud scenario (one of :data:`TYPOLOGIES`, or the source data set's
    scenario on replay, or of the demo world's episodes.TYPOLOGIES) and is ``None`` for
    legitimate transactions; ``episode`` names the fraud episode the transaction belongs to
    (the demo world's; None elsewhere).
    """

    tx: Transaction
    fraud: bool
    typology: str | None = None
    episode: str | None = None


# --------------------------------------------------------------------------------------------
# The simulated world
# --------------------------------------------------------------------------------------------

TOWN_CENTRES: Final = {"Helsinki": (60.1699, 24.9384), "Espoo": (60.2055, 24.6559),
                       "Vantaa": (60.2934, 25.0378), "Tampere": (61.4978, 23.7610),
                       "Turku": (60.4518, 22.2666), "Oulu": (65.0121, 25.4651)}
"""The simulated towns and where their centres are (latitude, longitude): the terminal
directory places the simulator's terminals around them."""
_TOWNS: Final = tuple(TOWN_CENTRES)
_TOWN_WEIGHTS: Final = (0.30, 0.18, 0.16, 0.14, 0.12, 0.10)

_POS_CATEGORIES: Final = ("Grocery", "Fuel", "Restaurants", "Retail", "Travel", "Electronics",
                          "Pharmacy")
_POS_WEIGHTS: Final = (0.30, 0.12, 0.22, 0.18, 0.05, 0.06, 0.07)
_ONLINE_CATEGORIES: Final = ("Retail", "Electronics", "Travel")
_ONLINE_WEIGHTS: Final = (0.50, 0.25, 0.25)
_HIGH_VALUE: Final = frozenset({"Retail", "Travel", "Electronics"})

_CATEGORY_SHIFT: Final[dict[str, float]] = {
    # log-multiplier on an account's typical spend: a flight costs more than a coffee
    "Grocery": 0.2, "Fuel": 0.5, "Restaurants": -0.4, "Retail": 0.3, "Travel": 1.6,
    "Electronics": 1.2, "Pharmacy": -0.2, "Gambling": 0.4, "Cash": 0.0,
}

_HOURLY_ACTIVITY: Final = (
    # relative card activity per local hour 00..23: quiet nights, lunch and evening peaks
    0.20, 0.10, 0.06, 0.05, 0.06, 0.15, 0.35, 0.70, 1.00, 1.15, 1.30, 1.45,
    1.65, 1.50, 1.35, 1.35, 1.50, 1.70, 1.75, 1.55, 1.25, 0.95, 0.60, 0.35,
)

_DAY: Final = 86400.0
_HABIT_TABLE: Final = 32          # quantisation of an account's habitual-terminal weights
_HABIT_WEIGHTS: Final = (0.40, 0.25, 0.15, 0.12, 0.08)
_P_HABITUAL: Final = 0.88         # share of an account's tx at its habitual terminals
_LEGIT_SIGMA: Final = 0.6         # per-transaction log-amount spread
_ATM_STEP: Final = 20.0
_BLOCK: Final = 4096



@dataclass(frozen=True, slots=True)
class _World:
    """Terminals and accounts of one simulated branch; built once per :func:`simulate` call."""

    term_ids: list[str]
    term_channel: list[Channel]
    term_cat: list[str]
    term_town: list[int]
    term_shift: list[float]
    pos_by_town: list[list[int]]       # non-gambling POS terminals per town
    atm_by_town: list[list[int]]
    pos_all: list[int]
    atm_all: list[int]
    online_all: list[int]              # non-gambling ONLINE terminals
    gambling: list[int]
    skimmable: list[int]               # POS/ATM terminals with habitual customers
    skim_weights: dict[int, float]     # terminal -> expected share of habitual traffic
    acc_ids: list[str]
    acc_mu: list[float]                # log of the account's typical spend
    acc_homes: list[tuple[int, ...]]
    acc_habits: list[frozenset[int]]
    acc_table: list[list[int]]         # _HABIT_TABLE habitual picks, weighted by repetition
    acc_gambler: list[bool]
    acc_cdf: npt.NDArray[np.float64]   # cumulative activity weights
    acc_cum: list[float]


def _weighted_town(rng: random.Random) -> int:
    return rng.choices(range(len(_TOWNS)), weights=_TOWN_WEIGHTS, k=1)[0]


def _build_world(rng: random.Random, np_rng: np.random.Generator, accounts: int,
                 terminals: int) -> _World:
    """Lay out terminals over the towns and give every account its habits.

    Habits are what make fraud detectable by behaviour alone: each account has home towns,
    a handful of habitual terminals and a spend level, so fraud that departs from them is
    anomalous while the legitimate noise (exploring other shops, travelling) keeps it hard.
    """
    n_towns = len(_TOWNS)
    n_atm = max(1, round(terminals * 0.12))
    n_online = max(1, round(terminals * 0.10))
    n_gamb = max(2, round(terminals * 0.04))
    n_pos = terminals - n_atm - n_online - n_gamb

    kinds: list[tuple[Channel, str, int]] = []
    for i in range(n_pos):
        town = i if i < n_towns else _weighted_town(rng)
        cat = rng.choices(_POS_CATEGORIES, weights=_POS_WEIGHTS, k=1)[0]
        kinds.append(("POS", cat, town))
    for i in range(n_atm):
        kinds.append(("ATM", "Cash", i if i < n_towns else _weighted_town(rng)))
    for _ in range(n_online):
        cat = rng.choices(_ONLINE_CATEGORIES, weights=_ONLINE_WEIGHTS, k=1)[0]
        kinds.append(("ONLINE", cat, _weighted_town(rng)))
    gamb_towns = list(range(n_towns))
    rng.shuffle(gamb_towns)
    for i in range(n_gamb):
        channel: Channel = "POS" if i % 2 == 0 else "ONLINE"
        kinds.append((channel, "Gambling", gamb_towns[i % n_towns]))
    rng.shuffle(kinds)  # ids must not reveal the terminal's kind

    term_channel = [k[0] for k in kinds]
    term_cat = [k[1] for k in kinds]
    term_town = [k[2] for k in kinds]
    pos_by_town: list[list[int]] = [[] for _ in range(n_towns)]
    atm_by_town: list[list[int]] = [[] for _ in range(n_towns)]
    online_all: list[int] = []
    gambling: list[int] = []
    for j, (channel, cat, town) in enumerate(kinds):
        if cat == "Gambling":
            gambling.append(j)
        elif channel == "POS":
            pos_by_town[town].append(j)
        elif channel == "ATM":
            atm_by_town[town].append(j)
        else:
            online_all.append(j)
    pos_all = [j for lst in pos_by_town for j in lst]
    atm_all = [j for lst in atm_by_town for j in lst]

    acc_mu: list[float] = []
    acc_homes: list[tuple[int, ...]] = []
    acc_habits: list[frozenset[int]] = []
    acc_table: list[list[int]] = []
    acc_gambler: list[bool] = []
    activity = np_rng.gamma(2.0, 1.0, size=accounts)
    traffic = [0.0] * terminals
    for a in range(accounts):
        home = _weighted_town(rng)
        homes: tuple[int, ...] = (home,)
        if rng.random() < 0.2:
            second = _weighted_town(rng)
            if second != home:
                homes = (home, second)
        acc_mu.append(rng.gauss(math.log(25.0), 0.6))
        gambler = rng.random() < 0.03
        acc_gambler.append(gambler)
        n_hab = rng.randint(2, 5)
        local_pos = [j for t in homes for j in pos_by_town[t]] or pos_all
        local_atm = [j for t in homes for j in atm_by_town[t]] or atm_all
        extras: list[int] = []
        if gambler:
            local_gamb = [j for j in gambling if term_town[j] in homes
                          and term_channel[j] == "POS"]
            extras.append(rng.choice(local_gamb or gambling))
        if rng.random() < 0.6:
            extras.append(rng.choice(local_atm))
        if rng.random() < 0.35 and online_all:
            extras.append(rng.choice(online_all))
        n_pos_hab = max(1, n_hab - len(extras))
        # at most 1 + 3 extras or n_hab <= 5 terminals, so _HABIT_WEIGHTS always covers them
        habits = rng.sample(local_pos, min(n_pos_hab, len(local_pos))) + extras
        weights = _HABIT_WEIGHTS[:len(habits)]
        total = sum(weights)
        cum = [sum(weights[:k + 1]) / total for k in range(len(weights))]
        table = [habits[min(bisect.bisect_right(cum, (k + 0.5) / _HABIT_TABLE), len(habits) - 1)]
                 for k in range(_HABIT_TABLE)]
        acc_habits.append(frozenset(habits))
        acc_table.append(table)
        acc_homes.append(homes)
        for j in table:
            traffic[j] += float(activity[a]) / _HABIT_TABLE

    skimmable = [j for j in pos_all + atm_all if traffic[j] > 0]
    cdf = np.cumsum(activity / activity.sum())
    cdf[-1] = 1.0
    return _World(
        term_ids=[f"T{j:04d}" for j in range(terminals)],
        term_channel=term_channel, term_cat=term_cat, term_town=term_town,
        term_shift=[_CATEGORY_SHIFT[c] for c in term_cat],
        pos_by_town=pos_by_town, atm_by_town=atm_by_town, pos_all=pos_all, atm_all=atm_all,
        online_all=online_all, gambling=gambling, skimmable=skimmable,
        skim_weights={j: traffic[j] for j in skimmable},
        acc_ids=[f"A{a:06d}" for a in range(accounts)], acc_mu=acc_mu, acc_homes=acc_homes,
        acc_habits=acc_habits, acc_table=acc_table, acc_gambler=acc_gambler,
        acc_cdf=cdf, acc_cum=[float(x) for x in cdf],
    )


def _atm_amount(mu: float, z: float) -> float:
    """Cash comes out in notes, so ATM amounts are multiples of 20 for everyone."""
    target = math.exp(mu + 0.9 + 0.5 * z)
    return float(min(500.0, max(_ATM_STEP, _ATM_STEP * round(target / _ATM_STEP))))


# --------------------------------------------------------------------------------------------
# Fraud episodes: each returns (seconds after the trigger, account, terminal, amount) tuples
# --------------------------------------------------------------------------------------------

_Event = tuple[float, int, int, float]


def _away(w: _World, a: int) -> list[int]:
    return [t for t in range(len(_TOWNS)) if t not in w.acc_homes[a]]


def _pick(rng: random.Random, candidates: list[int], avoid: frozenset[int],
          fallback: list[int]) -> int:
    fresh = [j for j in candidates if j not in avoid]
    return rng.choice(fresh or [j for j in fallback if j not in avoid] or fallback)


def _within(rng: random.Random, amount: float, low: float, high: float) -> float:
    """Bound an amount without clamping: a clamp piles fraud onto exact values such as
    60.00, a formatting tell that legitimate amounts would not share."""
    if amount < low:
        return rng.uniform(low, 2.0 * low)
    if amount > high:
        return rng.uniform(0.7 * high, high)
    return amount


def _victim(w: _World, rng: random.Random) -> int:
    return rng.choices(range(len(w.acc_ids)), cum_weights=w.acc_cum, k=1)[0]


def _stolen_card(w: _World, rng: random.Random, offsets: list[float]) -> list[_Event]:
    """A thief with the physical card: high amounts in shops and ATMs the owner never uses."""
    a = _victim(w, rng)
    away = _away(w, a)
    events: list[_Event] = []
    for t in offsets:
        town = rng.choice(away) if rng.random() < 0.75 else rng.choice(w.acc_homes[a])
        if rng.random() < 0.2:
            term = _pick(rng, w.atm_by_town[town], w.acc_habits[a], w.atm_all)
            amount = float(rng.choice((300, 400, 500, 600, 800, 1000)))
        else:
            shops = [j for j in w.pos_by_town[town] if w.term_cat[j] in _HIGH_VALUE]
            term = _pick(rng, shops, w.acc_habits[a], w.pos_all)
            if rng.random() < 0.15:
                amount = rng.uniform(5000.0, 9500.0)
            else:
                amount = math.exp(w.acc_mu[a] + w.term_shift[term]) * rng.uniform(3.0, 10.0)
        events.append((t, a, term, amount))
    return events


def _card_testing(w: _World, rng: random.Random, offsets: list[float]) -> list[_Event]:
    """Checking a stolen card number works: many tiny charges within minutes, mostly online."""
    a = _victim(w, rng)
    if rng.random() < 0.8 and w.online_all:
        term = _pick(rng, w.online_all, w.acc_habits[a], w.online_all)
    else:
        term = _pick(rng, w.pos_all, w.acc_habits[a], w.pos_all)
    return [(t, a, term, rng.uniform(0.5, 3.0)) for t in offsets]


def _account_takeover(w: _World, rng: random.Random, offsets: list[float]) -> list[_Event]:
    """Credentials in someone else's hands: a new town, new terminals, medium-high spend."""
    a = _victim(w, rng)
    town = rng.choice(_away(w, a))
    shops = [j for j in w.pos_by_town[town] if w.term_cat[j] in _HIGH_VALUE]
    online = [j for j in w.online_all if w.term_town[j] == town]
    pool = [j for j in shops + online if j not in w.acc_habits[a]] or w.pos_by_town[town]
    pool = pool or w.pos_all
    terms = rng.sample(pool, min(len(pool), rng.randint(2, 3)))
    events: list[_Event] = []
    for t in offsets:
        term = rng.choice(terms)
        base = math.exp(w.acc_mu[a] + w.term_shift[term]) * rng.uniform(2.0, 5.0)
        events.append((t, a, term, _within(rng, base, 60.0, 3000.0)))
    return events


def _risky_category(w: _World, rng: random.Random, offsets: list[float]) -> list[_Event]:
    """Gambling, away from home, on a card that does not normally gamble there."""
    a = _victim(w, rng)
    for _ in range(20):  # prefer non-gamblers; rare enough that a few tries always suffice
        if not w.acc_gambler[a]:
            break
        a = _victim(w, rng)
    away = [j for j in w.gambling if w.term_town[j] not in w.acc_homes[a]]
    events: list[_Event] = []
    for t in offsets:
        term = _pick(rng, away, w.acc_habits[a], w.gambling)
        amount = _within(rng, math.exp(w.acc_mu[a]) * rng.uniform(2.0, 8.0), 10.0, 2000.0)
        events.append((t, a, term, amount))
    return events


_Builder = Callable[[_World, random.Random, list[float]], list[_Event]]


@dataclass(frozen=True, slots=True)
class _Episode:
    """How one typology unfolds: who and where (``build``), how many and how fast."""

    build: _Builder
    min_size: int
    max_size: int
    first_mean: float      # mean delay of the first fraud after the trigger, seconds
    min_gap: float         # seconds between consecutive frauds: min_gap + Exp(mean_gap)
    mean_gap: float

    def offsets(self, rng: random.Random, size: int) -> list[float]:
        t = rng.expovariate(1 / self.first_mean)
        out = [t]
        for _ in range(size - 1):
            t += self.min_gap + rng.expovariate(1 / self.mean_gap)
            out.append(t)
        return out

    @property
    def horizon(self) -> float:
        """Generous bound on an episode's duration, for the warm start."""
        return 8.0 * (self.first_mean + (self.max_size - 1) * (self.min_gap + self.mean_gap))


_EPISODES: Final[dict[str, _Episode]] = {
    "stolen_card": _Episode(_stolen_card, 2, 6, 120.0, 30.0, 900.0),
    "card_testing": _Episode(_card_testing, 5, 15, 60.0, 2.0, 20.0),
    "account_takeover": _Episode(_account_takeover, 3, 6, 300.0, 60.0, 1800.0),
    "risky_category": _Episode(_risky_category, 1, 3, 300.0, 60.0, 1200.0),
}
_SKIM_MIN: Final = 10
_SKIM_MAX: Final = 30
"""A compromised terminal stays skimmed for its next 10-30 customer transactions. Counting
transactions instead of seconds keeps the fraud share independent of the load ``rate``; at a
realistic branch rate (~0.05 tx/s) that is a day or more."""


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------

class _DiurnalClock:
    """Map homogeneous 'activity seconds' to wall-clock seconds after ``start``.

    The hourly intensity averages to 1 over a day, so over whole days the mean gap is exactly
    what ``rate`` asks for, while nights are quiet. Inverting the cumulative intensity
    piecewise-linearly is exact for piecewise-constant hourly rates, and vectorises.
    """

    def __init__(self, start: datetime) -> None:
        weights = np.asarray(_HOURLY_ACTIVITY, dtype=np.float64)
        weights = weights / weights.mean()
        self._knots_x = np.arange(25, dtype=np.float64) * 3600.0
        self._knots_w = np.concatenate(([0.0], np.cumsum(weights) * 3600.0))
        self._knots_w[-1] = _DAY
        self._x: list[float] = self._knots_x.tolist()
        self._w: list[float] = self._knots_w.tolist()
        # an aware datetime's fields are its local wall clock, which is what people live by
        self._s0 = (start.hour * 3600 + start.minute * 60 + start.second
                    + start.microsecond / 1e6)
        self._w0 = float(np.interp(self._s0, self._knots_x, self._knots_w))

    def __call__(self, u: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        x = u + self._w0
        day = np.floor(x / _DAY)
        rem = x - day * _DAY
        wall: npt.NDArray[np.float64] = (day * _DAY + np.interp(rem, self._knots_w, self._knots_x)
                                         - self._s0)
        return wall

    def scalar(self, u: float) -> float:
        x = u + self._w0
        day = math.floor(x / _DAY)
        rem = x - day * _DAY
        k = min(max(bisect.bisect_right(self._w, rem) - 1, 0), 23)
        frac = (rem - self._w[k]) / (self._w[k + 1] - self._w[k])
        return day * _DAY + self._x[k] + frac * 3600.0 - self._s0


def _warm_start(episode: _Episode, trigger: float, inc: float, legit_rate: float,
                warp: _DiurnalClock | None, rng: np.random.Generator) -> list[list[float]]:
    """Absolute event times of the episodes triggered before the stream began (at legit
    counts below ``trigger``, stepping back by ``size / inc``) that still have frauds due at
    or after ``start``. Vectorised because at thousands of tx/s there are many thousands."""
    found: list[list[float]] = []
    span = episode.max_size - 1
    chunk = 4096
    c = trigger
    while True:
        sizes = rng.integers(episode.min_size, episode.max_size + 1, chunk)
        counts = c - np.cumsum(sizes / inc)
        c = float(counts[-1])
        u = counts / legit_rate
        t_back = warp(u) if warp is not None else u
        first = rng.exponential(episode.first_mean, chunk)
        gaps = episode.min_gap + rng.exponential(episode.mean_gap, (chunk, span))
        offsets = first[:, None] + np.concatenate((np.zeros((chunk, 1)), np.cumsum(gaps, 1)), 1)
        times = t_back[:, None] + offsets
        last = times[np.arange(chunk), sizes - 1]
        for i in np.flatnonzero((last >= 0.0) & (t_back >= -episode.horizon)).tolist():
            row: list[float] = times[i, :sizes[i]].tolist()
            found.append(row)
        if t_back[-1] < -episode.horizon:
            return found


def _world_of(seed: int, accounts: int, terminals: int) -> _World:
    """The accounts and terminals of ``seed``: the first of its four spawned sequences."""
    world_ss = np.random.SeedSequence(seed).spawn(4)[0]
    return _build_world(random.Random(int(world_ss.generate_state(1, np.uint64)[0])),
                        np.random.default_rng(world_ss), accounts, terminals)


def terminal_layout(seed: int = 7, *, accounts: int = 2000, terminals: int = 200
                    ) -> list[tuple[str, str, str]]:
    """(terminal id, channel, town) of every terminal of the world ``simulate`` builds with
    the same world seed and sizes (the terminal directory places them, terminal_directory.py)."""
    world = _world_of(seed, accounts, terminals)
    return [(tid, str(channel), _TOWNS[town]) for tid, channel, town in
            zip(world.term_ids, world.term_channel, world.term_town)]


def span_bound(count: int, rate: float, fraud_rate: float = 0.01) -> float:
    """Seconds of event time that the first ``count`` transactions of
    ``simulate(..., rate=rate, fraud_rate=fraud_rate, diurnal=False)`` span, at most (all
    but certainly: beyond it with a probability below 1e-9).

    Why: a stream published faster than its event times advance (a backlog, ``simulate
    --rate 0``) must start this far in the past to end before the clock, because a node
    dead-letters events from the future. Every fraud event is emitted at or before the
    legitimate arrival that follows it, so the span is that of at most ``count`` legitimate
    arrivals: a Poisson process at the legitimate rate, whose ``count``-th arrival is a
    Gamma time, bounded here by its mean plus 8 standard deviations plus 40 mean gaps
    (Bernstein's inequality for the Gamma tail puts the excess below exp(-23)).
    """
    if count < 0 or not (math.isfinite(rate) and rate > 0):
        raise SettingsError("need count >= 0 and a positive rate", field="rate", value=rate)
    legit_rate = rate * (1.0 - fraud_rate * sum(TYPOLOGY_SHARES[k] for k in _EPISODES))
    return (count + 8.0 * math.sqrt(count) + 40.0) / legit_rate


def simulate(seed: int = 7, *, start: datetime, rate: float = 50.0, count: int | None = None,
             accounts: int = 2000, terminals: int = 200, branch: str = "BR001",
             fraud_rate: float = 0.01, diurnal: bool = True, world: int | None = None
             ) -> Iterator[Labelled]:
    """Yield a deterministic stream of branch card transactions with labelled fraud.

    Timestamps start at ``start`` (must be tz-aware; emitted in UTC) and advance by
    exponential gaps averaging ``1/rate`` seconds. With ``diurnal`` (the default) the
    intensity follows the local clock of ``start`` (quiet nights, busy afternoons) and the
    average holds over whole days; ``diurnal=False`` gives a constant-rate Poisson stream,
    which is what a load test that paces by timestamp wants. ``count=None`` is infinite.

    About ``fraud_rate`` of the transactions are fraud, split per :data:`TYPOLOGY_SHARES`.
    Episodes are scheduled by a budget, not by coin flips, so the realised share stays close to
    ``fraud_rate`` even over a few thousand transactions. ``branch`` is validated (the caller
    publishes under it) but is not part of the transaction.

    Transaction ids are ``S<seed>-<n:09d>``, accounts ``A000123``, terminals ``T0042``.
    ``world`` (default: ``seed``) seeds the accounts and terminals alone, so that streams of
    different seeds can share one population: the demo restarts with fresh ids and the same
    customers at the same terminals.
    """
    require_identifier(branch, "branch")
    if start.tzinfo is None or start.utcoffset() is None:
        raise SettingsError("start must be timezone-aware", field="start", value=start,
                            hint="pass e.g. datetime(2025, 1, 6, tzinfo=timezone.utc)")
    if not (math.isfinite(rate) and rate > 0):
        raise SettingsError("rate must be a positive number of transactions per second",
                            field="rate", value=rate)
    if count is not None and count < 0:
        raise SettingsError("count must be >= 0 or None", field="count", value=count)
    if accounts < 1:
        raise SettingsError("need at least one account", field="accounts", value=accounts)
    if terminals < 20:
        raise SettingsError("need at least 20 terminals to lay out a branch",
                            field="terminals", value=terminals)
    if not 0.0 <= fraud_rate <= 0.5:
        raise SettingsError("fraud_rate must be within [0, 0.5]", field="fraud_rate",
                            value=fraud_rate)
    for name, value in (("seed", seed), ("world", seed if world is None else world)):
        if not isinstance(value, int) or not 0 <= value < 2**63:
            raise SettingsError(f"{name} must be an integer in [0, 2**63)", field=name,
                                value=value)
    _, stream_ss, episode_ss, warm_ss = np.random.SeedSequence(seed).spawn(4)
    people = _world_of(seed if world is None else world, accounts, terminals)
    return _stream(people, seed, start.astimezone(UTC), rate, count, fraud_rate,
                   _DiurnalClock(start) if diurnal else None,
                   np.random.default_rng(stream_ss),
                   random.Random(int(episode_ss.generate_state(1, np.uint64)[0])),
                   np.random.default_rng(warm_ss))


def _stream(w: _World, seed: int, start: datetime, rate: float, count: int | None,
            fraud_rate: float, warp: _DiurnalClock | None,
            np_rng: np.random.Generator, rng: random.Random,
            warm_rng: np.random.Generator) -> Iterator[Labelled]:
    """The hot loop: legitimate arrivals drawn in numpy blocks, fraud merged from a heap."""
    limit = -1 if count is None else count
    if limit == 0:
        return
    injected = [k for k in TYPOLOGIES if k in _EPISODES]
    f_inj = fraud_rate * sum(TYPOLOGY_SHARES[k] for k in injected)
    legit_rate = rate * (1.0 - f_inj)
    # fraud transactions owed per legitimate transaction, per typology
    inc = {k: fraud_rate * TYPOLOGY_SHARES[k] / (1.0 - f_inj) for k in TYPOLOGIES}
    sizes = {k: rng.randint(_EPISODES[k].min_size, _EPISODES[k].max_size) for k in injected}
    trigger = {k: (rng.random() * sizes[k] / inc[k]) if inc[k] > 0 else math.inf
               for k in injected}
    skim_size = rng.randint(_SKIM_MIN, _SKIM_MAX)
    inc_ct = inc["compromised_terminal"]
    skim_at = rng.random() * skim_size / inc_ct if inc_ct > 0 else math.inf
    skim_used: set[int] = set()
    skimmed: dict[int, int] = {}      # terminal -> legitimate tx still to be skimmed
    next_check = min([skim_at, *trigger.values()])

    heap: list[tuple[float, int, int, int, float, str]] = []
    pushed = 0
    # Warm start: episodes last minutes to hours of wall time, so a stream that only began
    # triggering at `start` would be short of fraud for its first hours (badly so at benchmark
    # rates, where 50k transactions span minutes). Run each typology's trigger sequence
    # backwards (vectorised: at high rates there are many) and queue the episodes still
    # running at `start`; victims and shops are only chosen when their first fraud is due.
    pending: dict[int, tuple[str, list[float]]] = {}
    for k in injected:
        if inc[k] <= 0:
            continue
        for times_back in _warm_start(_EPISODES[k], trigger[k], inc[k], legit_rate, warp,
                                      warm_rng):
            first = next(x for x in times_back if x >= 0.0)
            pending[pushed] = (k, times_back)
            heapq.heappush(heap, (first, pushed, -1, -1, 0.0, k))
            pushed += 1
    n = 0
    legit_n = 0
    u_last = 0.0
    prefix = f"S{seed}-"
    eur = "EUR"
    atm = "ATM"
    td = timedelta
    t_ids, t_ch, t_cat, t_loc, t_shift = (w.term_ids, w.term_channel, w.term_cat,
                                          [_TOWNS[t] for t in w.term_town], w.term_shift)
    a_ids, a_mu, a_table, a_homes = w.acc_ids, w.acc_mu, w.acc_table, w.acc_homes
    pos_by_town, atm_by_town, online_all = w.pos_by_town, w.atm_by_town, w.online_all
    n_towns = len(_TOWNS)

    while True:
        gaps = np_rng.exponential(1.0 / legit_rate, _BLOCK)
        u = u_last + np.cumsum(gaps)
        u_last = float(u[-1])
        times: list[float] = (warp(u) if warp is not None else u).tolist()
        accs: list[int] = np.searchsorted(w.acc_cdf, np_rng.random(_BLOCK),
                                          side="right").tolist()
        uni: list[list[float]] = np_rng.random((4, _BLOCK)).tolist()
        u1s, u2s, u3s, u4s = uni
        zs: list[float] = np_rng.standard_normal(_BLOCK).tolist()
        for i in range(_BLOCK):
            t = times[i]
            while heap and heap[0][0] <= t:
                ft, key, fa, fterm, famount, typ = heapq.heappop(heap)
                if fa < 0:  # a warm-start episode whose first fraud is due: cast it now
                    kind, times_back = pending.pop(key)
                    for ev in _EPISODES[kind].build(w, rng, times_back):
                        if ev[0] >= 0.0:
                            heapq.heappush(heap, (ev[0], pushed, ev[1], ev[2], ev[3], kind))
                            pushed += 1
                    continue
                yield Labelled(Transaction(
                    transaction_id=f"{prefix}{n:09d}", account_id=a_ids[fa],
                    amount=round(famount, 2), currency=eur, timestamp=start + td(seconds=ft),
                    terminal_id=t_ids[fterm], channel=t_ch[fterm],
                    merchant_category=t_cat[fterm], location=t_loc[fterm]), True, typ)
                n += 1
                if n == limit:
                    return
            a = accs[i]
            u2 = u2s[i]
            if u1s[i] < _P_HABITUAL:
                term = a_table[a][int(u2 * _HABIT_TABLE)]
            else:  # legitimate exploration: other shops at home, sometimes another town
                u3 = u3s[i]
                u4 = u4s[i]
                if u4 < 0.75:
                    homes = a_homes[a]
                    town = homes[int(u4 / 0.75 * len(homes))]
                else:
                    town = int((u4 - 0.75) * 4.0 * n_towns)
                if u3 < 0.80:
                    cands = pos_by_town[town] or w.pos_all
                elif u3 < 0.95:
                    cands = online_all or w.pos_all
                else:
                    cands = atm_by_town[town] or w.atm_all
                term = cands[int(u2 * len(cands))]
            channel = t_ch[term]
            if channel == atm:
                amount = _atm_amount(a_mu[a], zs[i])
            else:
                amount = round(math.exp(a_mu[a] + t_shift[term] + _LEGIT_SIGMA * zs[i]), 2)
                if amount < 0.01:
                    amount = 0.01
            fraud = False
            typology: str | None = None
            if skimmed and term in skimmed:
                fraud = True
                typology = "compromised_terminal"
                left = skimmed[term] - 1
                if left:
                    skimmed[term] = left
                else:
                    del skimmed[term]
            yield Labelled(Transaction(
                transaction_id=f"{prefix}{n:09d}", account_id=a_ids[a], amount=amount,
                currency=eur, timestamp=start + td(seconds=t), terminal_id=t_ids[term],
                channel=channel, merchant_category=t_cat[term], location=t_loc[term]),
                fraud, typology)
            n += 1
            if n == limit:
                return
            legit_n += 1
            if legit_n >= next_check:
                for k in injected:
                    while trigger[k] <= legit_n:
                        episode = _EPISODES[k]
                        for ev in episode.build(w, rng, episode.offsets(rng, sizes[k])):
                            heapq.heappush(heap, (t + ev[0], pushed, ev[1], ev[2], ev[3], k))
                            pushed += 1
                        sizes[k] = rng.randint(episode.min_size, episode.max_size)
                        trigger[k] += sizes[k] / inc[k]
                while skim_at <= legit_n:
                    pool = [j for j in w.skimmable if j not in skim_used and j not in skimmed]
                    if not pool:  # every terminal was skimmed once: start over
                        skim_used.clear()
                        pool = [j for j in w.skimmable if j not in skimmed]
                    weights = [w.skim_weights[j] for j in pool]
                    victim = rng.choices(pool, weights=weights, k=1)[0]
                    skim_used.add(victim)
                    skimmed[victim] = skim_size
                    skim_size = rng.randint(_SKIM_MIN, _SKIM_MAX)
                    skim_at += skim_size / inc_ct
                next_check = min([skim_at, *trigger.values()])
