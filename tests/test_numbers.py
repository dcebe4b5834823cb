"""Numbers as people write them (casework/numbers.py): grouped, never in exponent form,
amounts in their currency's minor units, shares as percentages, ages in whole units."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from appliance.casework.numbers import age_text, amount_text, number_text, percent_text


@pytest.mark.parametrize(("value", "shown"), [
    (12260.0, "12,260"), (12260, "12,260"), (1.226e4, "12,260"), (3.14159, "3.142"),
    (0.0123456, "0.01235"), (999999999.99, "1,000,000,000"), (0.0, "0"), (-42.5, "-42.5"),
    (1e20, "100,000,000,000,000,000,000"), (None, ""), (math.nan, "NaN"), (math.inf, "∞"),
    (True, "yes"),
])
def test_number_text(value: float | None, shown: str) -> None:
    assert number_text(value) == shown


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_never_an_exponent(value: float) -> None:
    text = number_text(value)
    assert "e" not in text.lower() and text.replace(",", "").lstrip("-").replace(".", "", 1
                                                                                 ).isdigit()
    if abs(value) >= 1000:  # whole, grouped in threes
        assert float(text.replace(",", "")) == pytest.approx(round(value), rel=1e-12)


@pytest.mark.parametrize(("amount", "currency", "shown"), [
    (12260, "EUR", "12,260.00 EUR"), (1500, "JPY", "1,500 JPY"), (1.5, "KWD", "1.500 KWD"),
    (999999999.99, "EUR", "999,999,999.99 EUR"), (None, "EUR", ""), (3, None, "3.00"),
])
def test_amount_text(amount: float | None, currency: str | None, shown: str) -> None:
    assert amount_text(amount, currency) == shown


def test_percent_and_age() -> None:
    assert (percent_text(0.8765), percent_text(1.0), percent_text(0.05, 0),
            percent_text(None)) == ("87.6 %", "100.0 %", "5 %", "")
    assert [age_text(s) for s in (-3, 5, 59.9, 61, 3 * 3600 + 5, 4 * 3600 - 1,
                                  2 * 86400 + 100, 1e9)] == [
        "0 s", "5 s", "59 s", "1 min", "3 h", "3 h", "2 d", "11,574 d"]
