"""Fraud episodes of the demo world: the six typologies a fraud team names, each a short run
of transactions with an episode id and its typology.

Rates: the world's ``fraud_share`` of all transactions is fraud, on average. It is spent as
episodes: ``episodes a day = fraud_share * expected transactions a day / mean episode size``,
the same expected number for each typology (Poisson per day), so each is represented in a few
weeks of a small branch. At the demo's default (0.3 %, 43,200 transactions a day) that is
about 27 episodes a day, four or five of each typology.

The shapes (what a rule for the typology would have to see; times are local, episodes start
between 07:00 and 21:00 and end the same day):

- ``velocity_burst``: 6-10 payments 5-40 s apart at the victim's own shops, 1-3 times the
  victim's mean amount: many in minutes where the customer makes a few a day;
- ``card_testing``: 8-15 charges of 0.50-2.99 at one online merchant, 3-30 s apart;
- ``amount_spike``: one payment 10-30 times the victim's mean (4-12 times the largest amount
  the customer plausibly makes, mean + 3 sd) at one of the victim's own shops;
- ``impossible_travel``: a payment at one of the victim's own shops, then 10-40 min later one
  or two in a town 150-600 km away (an away town of world.py);
- ``atm_cashout``: 3-6 withdrawals of 200-500 (notes of 20) at as many different ATMs,
  3-15 min apart;
- ``new_terminal_large``: one payment 4-8 times the victim's mean at a shop in the home towns
  the victim has never used (not within its radius).

Victims are customers with at least one transaction a day on average (an account with a
past). Episode ids are ``E<seed>-<yyyymmdd>-<n>``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Final

import numpy as np
import numpy.typing as npt

from ..scoring import rulebook
from .world import AWAY_TOWNS, HOME_TOWNS, RawEvent, World, atm_amount

__all__ = ["TYPOLOGIES", "MEAN_SIZE", "inject", "episodes_per_day"]

TYPOLOGIES: Final = rulebook.TYPOLOGIES
"""The shared names (rule reason codes, episode labels, fraud types on close): the rules'."""

MEAN_SIZE: Final[dict[str, float]] = {
    "velocity_burst": 8.0, "card_testing": 11.5, "amount_spike": 1.0,
    "impossible_travel": 2.5, "atm_cashout": 4.5, "new_terminal_large": 1.0,
}
"""Expected transactions per episode of each typology (from the shapes above)."""
_MEAN_EPISODE: Final = sum(MEAN_SIZE.values()) / len(MEAN_SIZE)
_HIGH_VALUE: Final = frozenset({"Electronics", "Retail", "Travel"})

_Build = Callable[[World, int, float, np.random.Generator], list[tuple[float, int, float]]]


def episodes_per_day(world: World) -> float:
    """Expected fraud episodes a day, all typologies together."""
    return world.fraud_share * world.expected_daily() / _MEAN_EPISODE


def _own_pos(w: World, c: int) -> npt.NDArray[np.int64]:
    s = int(w.usable_start[c])
    return w.usable[s:s + int(w.usable_pos[c])]


def _gaps(rng: np.random.Generator, n: int, low: float, high: float) -> list[float]:
    steps: list[float] = np.cumsum(rng.uniform(low, high, n - 1)).tolist()
    return [0.0, *steps]


def _velocity_burst(w: World, c: int, t: float, rng: np.random.Generator
                    ) -> list[tuple[float, int, float]]:
    n = int(rng.integers(6, 11))
    shops = _own_pos(w, c)
    mean = float(w.mean_amount[c])
    return [(t + dt, int(rng.choice(shops)), round(mean * float(rng.uniform(1.0, 3.0)), 2))
            for dt in _gaps(rng, n, 5.0, 40.0)]


def _card_testing(w: World, c: int, t: float, rng: np.random.Generator
                  ) -> list[tuple[float, int, float]]:
    n = int(rng.integers(8, 16))
    merchant = int(rng.choice(w.terminals_of("ONLINE")))
    return [(t + dt, merchant, round(float(rng.uniform(0.5, 2.99)), 2))
            for dt in _gaps(rng, n, 3.0, 30.0)]


def _amount_spike(w: World, c: int, t: float, rng: np.random.Generator
                  ) -> list[tuple[float, int, float]]:
    top = float(w.mean_amount[c] + 3 * w.std_amount[c])
    return [(t, int(rng.choice(_own_pos(w, c))), round(top * float(rng.uniform(4.0, 12.0)), 2))]


def _impossible_travel(w: World, c: int, t: float, rng: np.random.Generator
                       ) -> list[tuple[float, int, float]]:
    mean = float(w.mean_amount[c])
    first = (t, int(rng.choice(_own_pos(w, c))), round(mean * float(rng.uniform(0.8, 2.0)), 2))
    away = frozenset(AWAY_TOWNS)
    anywhere = w.terminals_of("POS", away) + w.terminals_of("ATM", away)
    far_town = w.town[int(rng.choice(anywhere))]  # a town that has terminals
    far = [j for j in anywhere if w.town[j] == far_town]
    later = t + float(rng.uniform(600.0, 2400.0))
    out = [first]
    for dt in _gaps(rng, int(rng.integers(1, 3)), 60.0, 600.0):
        j = int(rng.choice(far))
        amount = (float(atm_amount(np.array([mean * 3.0]))[0]) if w.channel[j] == "ATM"
                  else round(mean * float(rng.uniform(1.0, 4.0)), 2))
        out.append((later + dt, j, amount))
    return out


def _atm_cashout(w: World, c: int, t: float, rng: np.random.Generator
                 ) -> list[tuple[float, int, float]]:
    atms = w.terminals_of("ATM", frozenset(HOME_TOWNS))
    n = min(int(rng.integers(3, 7)), len(atms))
    picks = rng.choice(atms, size=n, replace=False).tolist()
    return [(t + dt, int(j), 20.0 * float(rng.integers(10, 26)))
            for dt, j in zip(_gaps(rng, n, 180.0, 900.0), picks)]


def _new_terminal_large(w: World, c: int, t: float, rng: np.random.Generator
                        ) -> list[tuple[float, int, float]]:
    own = set(_own_pos(w, c).tolist())
    shops = [j for j in w.terminals_of("POS", frozenset(HOME_TOWNS))
             if j not in own and w.category[j] in _HIGH_VALUE]
    shops = shops or [j for j in w.terminals_of("POS") if j not in own]
    mean = float(w.mean_amount[c])
    return [(t, int(rng.choice(shops)), round(mean * float(rng.uniform(4.0, 8.0)), 2))]


_BUILDERS: Final[dict[str, _Build]] = {
    "velocity_burst": _velocity_burst, "card_testing": _card_testing,
    "amount_spike": _amount_spike, "impossible_travel": _impossible_travel,
    "atm_cashout": _atm_cashout, "new_terminal_large": _new_terminal_large,
}


def inject(world: World, day: date, legit: list[RawEvent], rng: np.random.Generator
           ) -> list[RawEvent]:
    """The fraud episodes of ``day`` (see the module docstring). ``legit`` is the day's
    legitimate traffic (not changed; episodes are added beside it)."""
    if world.fraud_share <= 0:
        return []
    victims = np.flatnonzero(world.mean_daily >= 1.0)
    if not len(victims):
        return []
    each = episodes_per_day(world) / len(TYPOLOGIES)
    out: list[RawEvent] = []
    n = 0
    for typology in TYPOLOGIES:
        for _ in range(int(rng.poisson(each))):
            victim = int(rng.choice(victims))
            start = float(rng.uniform(7 * 3600.0, 21 * 3600.0))
            episode = f"E{world.seed}-{day:%Y%m%d}-{n:03d}"
            n += 1
            out.extend((secs, victim, j, max(0.01, amount), typology, episode)
                       for secs, j, amount in _BUILDERS[typology](world, victim, start, rng)
                       if secs < 86400.0)
    return out
