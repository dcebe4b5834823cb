"""Disposition codes: how an analyst closes a case, and what label that makes.

A case is closed with one code. Each code fixes the case's closed status and the label of
the alert's transaction (1 fraud, 0 not); a fraud code also needs a fraud type, one of the
typologies (``scoring.labels.FRAUD_TYPES``), which becomes the label's typology. A small
set on purpose: each code is a distinct outcome a team counts, not free text (the case's
notes say the rest).

=====================  ===============  =====  ==========================================
code                   status           label  when
=====================  ===============  =====  ==========================================
``confirmed_fraud``    CONFIRMED_FRAUD  1      fraud, confirmed by the checks or the
                                               cardholder; give the fraud type
``customer_confirmed`` FALSE_POSITIVE   0      the cardholder confirmed they made it
``false_positive``     FALSE_POSITIVE   0      checked, nothing wrong found
``duplicate``          FALSE_POSITIVE   0      the same payment sent twice (a terminal or
                                               customer repeat), not fraud
``other``              FALSE_POSITIVE   0      not fraud, for another reason: say why in a
                                               note
=====================  ===============  =====  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scoring.labels import FRAUD_TYPES


@dataclass(frozen=True)
class Disposition:
    code: str
    status: str
    """The closed status the case takes."""
    label: int
    """The transaction's label: 1 fraud, 0 not."""
    meaning: str

    @property
    def fraud(self) -> bool:
        return self.label == 1


DISPOSITIONS: dict[str, Disposition] = {d.code: d for d in (
    Disposition("confirmed_fraud", "CONFIRMED_FRAUD", 1,
                "fraud, confirmed by the checks or the cardholder"),
    Disposition("customer_confirmed", "FALSE_POSITIVE", 0,
                "the cardholder confirmed they made it"),
    Disposition("false_positive", "FALSE_POSITIVE", 0, "checked, nothing wrong found"),
    Disposition("duplicate", "FALSE_POSITIVE", 0,
                "the same payment sent twice (a terminal or customer repeat), not fraud"),
    Disposition("other", "FALSE_POSITIVE", 0, "not fraud, for another reason (say why in a "
                                              "note)"),
)}
CODES = tuple(DISPOSITIONS)
__all__ = ["CODES", "DISPOSITIONS", "FRAUD_TYPES", "Disposition", "problem"]


def problem(code: str | None, fraud_type: str | None) -> tuple[str, str] | None:
    """Why ``code`` with ``fraud_type`` cannot close a case, as (field, message), or None
    when they can: the code must be known, a fraud code needs a fraud type, any other code
    takes none."""
    if code is None:
        return "disposition", "closing a case needs a disposition: one of " + ", ".join(CODES)
    disposition = DISPOSITIONS.get(code)
    if disposition is None:
        return "disposition", f"unknown disposition {code!r}; one of " + ", ".join(CODES)
    if disposition.fraud and fraud_type is None:
        return "fraud_type", (f"{code} needs a fraud_type: one of " + ", ".join(FRAUD_TYPES))
    if fraud_type is not None and fraud_type not in FRAUD_TYPES:
        return "fraud_type", (f"unknown fraud_type {fraud_type!r}; one of "
                              + ", ".join(FRAUD_TYPES))
    if not disposition.fraud and fraud_type is not None:
        return "fraud_type", f"{code} is not fraud: give no fraud_type"
    return None
