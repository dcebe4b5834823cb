"""The demo's world: a branch's customers and terminals, drawn like the Fraud Detection
Handbook's generator (Le Borgne et al., *Reproducible Machine Learning for Credit Card Fraud
Detection*, chapter 3), placed in real towns.

Why a second generator beside simulate.py: simulate.py is the benchmarks' and tests' load
generator (any rate, constant scale per account); the demo needs a *branch*, whose customers
each make a few payments a day, so that "n transactions in the last hour" means something.

The Handbook's recipe, kept:
- each customer has a home, a mean amount ``U(5, 100)`` with standard deviation half of it,
  and a mean number of transactions per day ``U(0, 4)``;
- each day, a customer makes ``Poisson(mean)`` transactions, at times drawn around noon
  (normal, sd 20,000 s; draws outside the day are dropped, as the Handbook does), for
  amounts drawn normal around the customer's own mean (a negative draw is redrawn uniform in
  ``(0, 2 * mean)``);
- each customer uses the terminals within a radius of home (here ``radius_km``), at random.

What it adds: terminals stand in towns around the branch (real coordinates, so the terminal
directory can place them and impossible travel can be computed), as POS terminals with a
merchant category, ATMs (cash comes in notes of 20) and a few online merchants with no place;
a small share of each customer's payments is at an ATM or online. Fraud comes as *episodes*
of the six typologies (episodes.py), each with an id and its typology.

Deterministic: day ``d`` of world ``seed`` is always the same list of transactions with the
same ids (``W<seed>-<yyyymmdd>-<n>``), whatever was asked before it, so a restarted demo
regenerates exactly the days it needs and nothing is stored twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Final
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from ..errors import SettingsError
from ..transaction import Channel, Transaction
from .simulate import Labelled

__all__ = ["World", "build_world", "day_events", "events_between", "customers_for_rate"]

ZONE: Final = ZoneInfo("Europe/Helsinki")
"""The branch's clock: event times carry its offset (hour_of_day is local)."""

HOME_TOWNS: Final = {  # name: (latitude, longitude, share of customers and terminals)
    "Helsinki": (60.1699, 24.9384, 0.50),
    "Espoo": (60.2055, 24.6559, 0.25),
    "Vantaa": (60.2934, 25.0378, 0.20),
    "Kerava": (60.4034, 25.1050, 0.05),
}
"""Where the branch's customers live, and most of its terminals stand."""
AWAY_TOWNS: Final = {  # name: (latitude, longitude, share of the away terminals)
    "Tampere": (61.4978, 23.7610, 0.45),
    "Turku": (60.4518, 22.2666, 0.35),
    "Oulu": (65.0121, 25.4651, 0.20),
}
"""Towns 150-600 km away: no customer lives there; a card used there soon after a payment at
home has travelled impossibly fast (the impossible_travel typology)."""
TOWNS: Final = {**{k: v[:2] for k, v in HOME_TOWNS.items()},
                **{k: v[:2] for k, v in AWAY_TOWNS.items()}}

POS_CATEGORIES: Final = ("Grocery", "Restaurants", "Retail", "Fuel", "Pharmacy",
                         "Electronics", "Travel")
_POS_WEIGHTS: Final = (0.32, 0.22, 0.20, 0.10, 0.08, 0.05, 0.03)
ONLINE_CATEGORIES: Final = ("Retail", "Electronics", "Travel", "Retail", "Digital goods",
                            "Retail", "Electronics", "Digital goods")
MEAN_DAILY_TX: Final = 2.0
"""Mean of ``U(0, 4)``: transactions per customer per day, on average."""
MAX_RATE: Final = 10.0
"""The demo world is a branch: 432,000 customers at most (it is built customer by customer)."""
ATM_SHARE: Final = 0.08
ONLINE_SHARE: Final = 0.12
_DAY: Final = 86400.0
_KM_PER_DEG: Final = 111.0


@dataclass(frozen=True)
class World:
    """One branch: its customers' profiles and its terminals (arrays index by number)."""

    seed: int
    fraud_share: float
    """Expected share of all transactions that are fraud (episodes.py spreads it)."""
    # customers
    account_ids: list[str]
    home: npt.NDArray[np.float64]          # (n, 2) latitude, longitude
    mean_amount: npt.NDArray[np.float64]
    std_amount: npt.NDArray[np.float64]
    mean_daily: npt.NDArray[np.float64]    # U(0, 4)
    usable: npt.NDArray[np.int64]          # flat terminal numbers, POS then ATM per customer
    usable_start: npt.NDArray[np.int64]    # customer c's: usable[start[c]:start[c] + n[c]]
    usable_pos: npt.NDArray[np.int64]      # how many of them are POS (they come first)
    usable_atm: npt.NDArray[np.int64]
    # terminals
    terminal_ids: list[str]
    channel: list[Channel]
    category: list[str]
    town: list[str | None]                 # None online
    place: npt.NDArray[np.float64]         # (m, 2); NaN online

    @property
    def customers(self) -> int:
        return len(self.account_ids)

    def terminals_of(self, channel: Channel, towns: frozenset[str] | None = None
                     ) -> list[int]:
        """Terminal numbers of ``channel`` (in ``towns`` when given)."""
        return [j for j, (c, t) in enumerate(zip(self.channel, self.town))
                if c == channel and (towns is None or t in towns)]

    def expected_daily(self) -> float:
        """Legitimate transactions per day, expected (before the Handbook's drop of times
        outside the day, which removes about 3 % of them)."""
        return float(self.mean_daily.sum())

    def sites(self) -> list[tuple[str, str, float | None, float | None]]:
        """(terminal id, name, latitude, longitude) of every terminal: the directory rows."""
        out: list[tuple[str, str, float | None, float | None]] = []
        for j, tid in enumerate(self.terminal_ids):
            town = self.town[j]
            if town is None:
                out.append((tid, f"online merchant {tid} ({self.category[j]})", None, None))
            else:
                lat, lon = self.place[j]
                out.append((tid, f"{town} {self.channel[j]} {tid} ({self.category[j]})",
                            round(float(lat), 6), round(float(lon), 6)))
        return out


def customers_for_rate(rate: float) -> int:
    """Customers whose Handbook activity (2 transactions a day on average) makes ``rate``
    transactions per second: the live rate of the demo *is* its world's size."""
    if not (math.isfinite(rate) and 0 < rate <= MAX_RATE):
        raise SettingsError(f"the demo rate must be above 0 and at most {MAX_RATE:g} "
                            "transactions per second (a branch)", field="demo_rate", value=rate,
                            hint="for load, publish the load simulator: branchguard simulate "
                                 "--rate R")
    return max(10, round(rate * _DAY / MEAN_DAILY_TX))


def _scatter(rng: np.random.Generator, centre: tuple[float, float], n: int, km: float
             ) -> npt.NDArray[np.float64]:
    lat, lon = centre
    north, east = rng.normal(0.0, km, n), rng.normal(0.0, km, n)
    return np.column_stack((lat + north / _KM_PER_DEG,
                            lon + east / (_KM_PER_DEG * math.cos(math.radians(lat)))))


def distance_km(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]
                ) -> npt.NDArray[np.float64]:
    """Great-circle distance (haversine, km) between rows of (latitude, longitude)."""
    la1, lo1, la2, lo2 = (np.radians(x) for x in (a[..., 0], a[..., 1], b[..., 0], b[..., 1]))
    h = (np.sin((la2 - la1) / 2) ** 2
         + np.cos(la1) * np.cos(la2) * np.sin((lo2 - lo1) / 2) ** 2)
    out: npt.NDArray[np.float64] = 2 * 6371.0 * np.arcsin(np.sqrt(np.minimum(h, 1.0)))
    return out


def build_world(seed: int = 18, *, customers: int = 2000, fraud_share: float = 0.003,
                radius_km: float = 3.0) -> World:
    """The customers and terminals of world ``seed`` (see the module docstring).

    Terminals scale with customers (one POS per 40, one ATM per 400, at least 30 and 8),
    plus 8 online merchants; about a tenth of the POS and ATMs stand in the away towns.
    ``fraud_share`` is the expected share of fraud among all transactions (0 to 0.05: a
    fraction of a percent is realistic; the Handbook's is 0.8 %).
    """
    if customers < 10:
        raise SettingsError("need at least 10 customers", field="customers", value=customers)
    if not 0.0 <= fraud_share <= 0.05:
        raise SettingsError("fraud_share must be within [0, 0.05]", field="fraud_share",
                            value=fraud_share)
    if not (math.isfinite(radius_km) and radius_km > 0):
        raise SettingsError("radius_km must be positive", field="radius_km", value=radius_km)
    rng = np.random.default_rng([seed, 0])
    n_pos, n_atm = max(30, customers // 40), max(8, customers // 400)
    channel: list[Channel] = []
    category: list[str] = []
    town: list[str | None] = []
    places: list[npt.NDArray[np.float64]] = []
    for kind, count in (("POS", n_pos), ("ATM", n_atm)):
        away = max(3, count // 10)
        for towns, total in ((HOME_TOWNS, count - away), (AWAY_TOWNS, away)):
            names = list(towns)
            share = np.array([towns[t][2] for t in names])
            per_town = rng.multinomial(total, share / share.sum())
            for name, k in zip(names, per_town.tolist()):
                lat, lon = towns[name][:2]
                places.append(_scatter(rng, (lat, lon), k, 2.5))
                for _ in range(k):
                    channel.append("POS" if kind == "POS" else "ATM")
                    town.append(name)
                    category.append(str(rng.choice(POS_CATEGORIES, p=_POS_WEIGHTS))
                                    if kind == "POS" else "Cash")
    for cat in ONLINE_CATEGORIES:
        channel.append("ONLINE")
        category.append(cat)
        town.append(None)
        places.append(np.full((1, 2), np.nan))
    place = np.concatenate(places)
    order = rng.permutation(len(channel))  # ids must not reveal a terminal's kind or town
    channel = [channel[j] for j in order]
    category = [category[j] for j in order]
    town = [town[j] for j in order]
    place = place[order]

    names = list(HOME_TOWNS)
    share = np.array([HOME_TOWNS[t][2] for t in names])
    homes_town = rng.choice(len(names), size=customers, p=share / share.sum())
    home = np.empty((customers, 2))
    for i, name in enumerate(names):
        mask = homes_town == i
        home[mask] = _scatter(rng, HOME_TOWNS[name][:2], int(mask.sum()), 2.5)
    mean_amount = rng.uniform(5.0, 100.0, customers)
    std_amount = mean_amount / 2.0
    mean_daily = rng.uniform(0.0, 4.0, customers)

    is_pos = np.array([c == "POS" for c in channel])
    is_atm = np.array([c == "ATM" for c in channel])
    usable: list[int] = []
    starts, n_pos_of, n_atm_of = [], [], []
    for c in range(customers):
        dist = distance_km(home[c][None, :], place)
        picks = []
        for mask, fallback in ((is_pos, 3), (is_atm, 1)):
            near = np.flatnonzero(mask & (dist <= radius_km))
            if len(near) < fallback:  # nobody lives out of reach of a shop: the nearest
                cands = np.flatnonzero(mask)
                near = cands[np.argsort(dist[cands])[:fallback]]
            picks.append(near)
        starts.append(len(usable))
        n_pos_of.append(len(picks[0]))
        n_atm_of.append(len(picks[1]))
        usable.extend(picks[0].tolist() + picks[1].tolist())
    return World(
        seed=seed, fraud_share=fraud_share,
        account_ids=[f"C{c:06d}" for c in range(customers)], home=home,
        mean_amount=mean_amount, std_amount=std_amount, mean_daily=mean_daily,
        usable=np.array(usable, dtype=np.int64), usable_start=np.array(starts, dtype=np.int64),
        usable_pos=np.array(n_pos_of, dtype=np.int64),
        usable_atm=np.array(n_atm_of, dtype=np.int64),
        terminal_ids=[f"P{j:05d}" for j in range(len(channel))], channel=channel,
        category=category, town=town, place=place)


def atm_amount(amount: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Cash comes out in notes: a multiple of 20, at least 20 (about twice a payment)."""
    out: npt.NDArray[np.float64] = 20.0 * np.maximum(1.0, np.round(2.0 * amount / 20.0))
    return out


# A raw event before it becomes a Transaction: (seconds after local midnight, customer,
# terminal, amount, typology or None, episode id or None)
RawEvent = tuple[float, int, int, float, "str | None", "str | None"]


def legitimate(world: World, day: date, rng: np.random.Generator) -> list[RawEvent]:
    """The customers' own transactions on ``day`` (the Handbook's recipe, vectorised)."""
    counts = rng.poisson(world.mean_daily)
    cust = np.repeat(np.arange(world.customers), counts)
    n = len(cust)
    secs = rng.normal(_DAY / 2, 20000.0, n)
    mean, std = world.mean_amount[cust], world.std_amount[cust]
    amount = rng.normal(mean, std)
    redraw = amount <= 0
    amount[redraw] = rng.uniform(0.0, 2.0 * mean[redraw])
    u_channel, u_pick, u_online = rng.random(n), rng.random(n), rng.random(n)
    keep = (secs >= 0) & (secs < _DAY)
    online = [j for j, c in enumerate(world.channel) if c == "ONLINE"]
    n_pos, n_atm = world.usable_pos[cust], world.usable_atm[cust]
    start = world.usable_start[cust]
    atm = (u_channel < ATM_SHARE) & (n_atm > 0)
    web = ~atm & (u_channel < ATM_SHARE + ONLINE_SHARE)
    pos = ~atm & ~web
    term = np.empty(n, dtype=np.int64)
    term[pos] = world.usable[start[pos] + (u_pick[pos] * n_pos[pos]).astype(np.int64)]
    term[atm] = world.usable[start[atm] + n_pos[atm]
                             + (u_pick[atm] * n_atm[atm]).astype(np.int64)]
    term[web] = np.array(online, dtype=np.int64)[(u_online[web] * len(online)).astype(np.int64)]
    amount[atm] = atm_amount(amount[atm])
    amount = np.maximum(0.01, np.round(amount, 2))
    rows = zip(secs[keep].tolist(), cust[keep].tolist(), term[keep].tolist(),
               amount[keep].tolist())
    return [(s, c, j, a, None, None) for s, c, j, a in rows]


def day_events(world: World, day: date) -> list[Labelled]:
    """Every transaction of ``day`` (local), legitimate and fraud, in time order, with ids
    ``W<seed>-<yyyymmdd>-<n>`` by that order (so an id tells nothing of its label)."""
    from .episodes import inject

    rng = np.random.default_rng([world.seed, day.toordinal()])
    raw = legitimate(world, day, rng)
    raw.extend(inject(world, day, raw, np.random.default_rng([world.seed, day.toordinal(), 1])))
    raw.sort(key=lambda e: e[0])
    midnight = datetime(day.year, day.month, day.day, tzinfo=ZONE)
    prefix = f"W{world.seed}-{day:%Y%m%d}-"
    ids, chan, cat, town = world.account_ids, world.channel, world.category, world.town
    tids = world.terminal_ids
    out: list[Labelled] = []
    for n, (secs, c, j, amount, typology, episode) in enumerate(raw):
        # local wall time -> an aware time with the offset in force then (DST-safe)
        stamp = (midnight + timedelta(seconds=secs)).astimezone(timezone.utc).astimezone(ZONE)
        out.append(Labelled(Transaction(
            transaction_id=f"{prefix}{n:06d}", account_id=ids[c], amount=amount,
            currency="EUR", timestamp=stamp, terminal_id=tids[j], channel=chan[j],
            merchant_category=cat[j], location=town[j]),
            typology is not None, typology, episode))
    return out


def events_between(world: World, start: datetime, end: datetime | None = None
                   ) -> Iterator[Labelled]:
    """The world's transactions with ``start < timestamp`` (and ``< end`` when given), in
    time order, day after day (endless without ``end``)."""
    if start.tzinfo is None:
        raise SettingsError("start must be timezone-aware", field="start", value=start)
    lo = start.timestamp()
    hi = math.inf if end is None else end.timestamp()
    day = start.astimezone(ZONE).date()
    while True:
        first = datetime(day.year, day.month, day.day, tzinfo=ZONE).timestamp()
        if first >= hi:
            return
        for item in day_events(world, day):
            t = item.tx.timestamp.timestamp()
            if t >= hi:
                return
            if t > lo:
                yield item
        day += timedelta(days=1)
