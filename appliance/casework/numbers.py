"""Numbers as a person writes them, for everything the console shows: ``12,260`` and
``12,260.00 EUR``, never ``1.226e+04``; risk as a percentage; an alert's age as ``3 h``.

One place, so every page writes numbers the same way. Babel (CLDR data) does the digit
grouping and knows each currency's minor units (JPY has none, KWD three); the console writes
English (``en``) throughout. The API returns plain JSON numbers: formatting is for people.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

from babel import numbers as babel_numbers

LOCALE = "en"
SIGNIFICANT = 4
"""Significant digits kept of a measured value below 1,000 (above it, whole numbers)."""
MAX_DECIMALS = 6
R = TypeVar("R")


def _wide(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` with Decimal precision for any float (Babel rounds in Decimal, whose default
    28 digits fail on amounts from 1e28 up, which a hostile or broken terminal can send)."""
    @wraps(fn)
    def call(*args: object, **kwargs: object) -> R:
        with decimal.localcontext() as context:
            context.prec = 400
            return fn(*args, **kwargs)
    return call


format_decimal = _wide(babel_numbers.format_decimal)
format_currency = _wide(babel_numbers.format_currency)


def number_text(value: float | int | None) -> str:
    """A count or measured value: whole numbers grouped (``12,260``), others with about
    four significant digits (``3.142``, ``0.01235``), never in exponent form; None, NaN and
    infinities as they are (empty, ``NaN``, ``∞``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return format_decimal(value, locale=LOCALE)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if value == 0 or abs(value) >= 10 ** (SIGNIFICANT - 1):
        decimals = 0
    else:
        decimals = min(MAX_DECIMALS,
                       SIGNIFICANT - 1 - math.floor(math.log10(abs(value))))
    return format_decimal(value, format="#,##0." + "#" * decimals if decimals else "#,##0",
                          locale=LOCALE)


def amount_text(amount: float | None, currency: str | None) -> str:
    """A money amount with its ISO 4217 code after it, in the currency's own minor units:
    ``12,260.00 EUR``, ``1,500 JPY``. Empty when there is no amount (a purged transaction);
    an unknown code is shown as given, with two decimals."""
    if amount is None:
        return ""
    if not currency:
        return format_decimal(amount, format="#,##0.00", locale=LOCALE)
    return str(format_currency(amount, currency, format="#,##0.00 ¤¤", locale=LOCALE,
                               currency_digits=True))


def percent_text(share: float | None, decimals: int = 1) -> str:
    """A share in [0, 1] as a percentage: ``87.6 %`` (risk, rates)."""
    if share is None:
        return ""
    return format_decimal(100 * share, format="#,##0." + "0" * decimals if decimals
                          else "#,##0", locale=LOCALE) + " %"


def age_text(seconds: float) -> str:
    """How long ago, in the largest whole unit: ``45 s``, ``12 min``, ``3 h``, ``2 d``
    (rounded down: an alert is "3 h" old from three hours until four)."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{number_text(int(seconds // size))} {unit}"
    return f"{int(seconds)} s"
