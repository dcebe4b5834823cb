"""Replaying recorded transactions: the reference system's CSV and the Fraud Detection
Handbook's, as labelled transactions; and the labels file that keeps ground truth apart.

Labels never go into a :class:`~appliance.transaction.Transaction`: they travel beside it in
:class:`~appliance.feed.simulate.Labelled` and are written to a file of their own.
"""

from __future__ import annotations

import csv
import math
import gzip
import io
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Literal

from ..errors import BranchguardError
from ..transaction import ID_PATTERN, Transaction, require_identifier
from .simulate import Labelled

__all__ = ["Replay", "read_labels", "replay_csv", "sanitise_id", "write_labels"]

UTC: Final = timezone.utc
_ID_RE: Final = re.compile(ID_PATTERN)
_ID_BAD_RUN: Final = re.compile(r"[^A-Za-z0-9_-]+")

# --------------------------------------------------------------------------------------------
# Labels file
# --------------------------------------------------------------------------------------------

_LABEL_HEADER: Final = ("transaction_id", "label", "typology")


def _open_text(path: Path, mode: Literal["r", "w"]) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.GzipFile(path, mode + "b"), encoding="utf-8", newline="")
    return open(path, mode, encoding="utf-8", newline="")


def write_labels(items: Iterable[Labelled], path: Path) -> int:
    """Write ``transaction_id,label,typology`` (label 1/0, typology empty when legitimate).

    Labels travel in their own file so the transactions published to the node stay exactly
    what a terminal would send. A ``.gz`` suffix compresses. Returns the number of rows.
    """
    rows = 0
    with _open_text(path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(_LABEL_HEADER)
        for item in items:
            writer.writerow((item.tx.transaction_id, 1 if item.fraud else 0, item.typology or ""))
            rows += 1
    return rows


def read_labels(path: Path) -> dict[str, tuple[bool, str | None]]:
    """Read a :func:`write_labels` file back: ``transaction_id -> (fraud, typology)``."""
    with _open_text(path, "r") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != _LABEL_HEADER:
            raise BranchguardError("not a labels file", field="header", value=header,
                                   hint="expected header " + ",".join(_LABEL_HEADER))
        return {row[0]: (row[1].strip() == "1", row[2] or None) for row in reader if row}


# --------------------------------------------------------------------------------------------
# CSV replay
# --------------------------------------------------------------------------------------------

_REFERENCE: Final = ("transaction_id", "account_id", "timestamp", "amount",
                     "merchant_category", "location", "is_fraud")
_HANDBOOK: Final = ("TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT",
                    "TX_TIME_SECONDS", "TX_TIME_DAYS", "TX_FRAUD", "TX_FRAUD_SCENARIO")
_HANDBOOK_USED: Final = ("TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID",
                         "TX_AMOUNT", "TX_FRAUD", "TX_FRAUD_SCENARIO")
_HANDBOOK_SCENARIOS: Final = {1: "high_amount", 2: "compromised_terminal",
                              3: "compromised_customer"}
_FORMATS: Final = {"reference": (_REFERENCE, _REFERENCE), "handbook": (_HANDBOOK, _HANDBOOK_USED)}
_HINT: Final = ("supported headers: reference system: " + ",".join(_REFERENCE)
                + "; Fraud Detection Handbook: " + ",".join(_HANDBOOK))
_TRUE: Final = frozenset({"1", "1.0", "true", "yes"})
_FALSE: Final = frozenset({"0", "0.0", "false", "no"})


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def sanitise_id(raw: str) -> str | None:
    """Force ``raw`` into the identifier pattern, or ``None`` when nothing usable is left.

    Ids become subject tokens, so accents are folded, every run of other characters becomes
    ``_`` and the result is cut at 64 characters. Distinct raw ids can collide (``a.b`` and
    ``a b``); for the supported data sets they never do.
    """
    text = raw.strip()
    if _ID_RE.match(text):
        return text
    text = _ID_BAD_RUN.sub("_", _ascii(text))[:64]
    return text if text.strip("_") else None


def _slug(text: str) -> str:
    return _ID_BAD_RUN.sub("-", _ascii(text)).strip("-")


def _timestamp(text: str) -> datetime:
    ts = datetime.fromisoformat(text.strip())
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _amount(text: str) -> float | None:
    try:
        value = round(float(text), 2)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 < value < 1e9 else None


def _flag(text: str) -> bool | None:
    value = text.strip().lower()
    return True if value in _TRUE else False if value in _FALSE else None


def _text(text: str) -> str | None:
    value = text.strip()[:64]
    return value or None


def _open_csv(path: Path) -> IO[str]:
    """Open plain or gzip CSV, judged by the magic bytes rather than trusting the suffix."""
    try:
        with open(path, "rb") as raw:
            magic = raw.read(2)
        if magic == b"\x1f\x8b":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise BranchguardError(f"cannot open {path}: {exc.strerror or exc}", field="path",
                               value=str(path), hint="check the file exists and is readable"
                               ) from exc


def _detect(path: Path) -> tuple[str, dict[str, int]]:
    with _open_csv(path) as fh:
        try:
            header = next(csv.reader(fh), None)
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, csv.Error) as exc:
            raise BranchguardError(f"{path} is not a readable CSV: {exc}", field="path",
                                   value=str(path), hint=_HINT) from exc
    names = [h.strip() for h in header or []]
    for fmt, (_, used) in _FORMATS.items():
        if set(used) <= set(names):
            return fmt, {name: names.index(name) for name in used}
    raise BranchguardError(f"unrecognised CSV header in {path}", field="header",
                           value=names, hint=_HINT)


class Replay(Iterator[Labelled]):
    """Iterator over a replayed CSV that also counts what it had to drop.

    Only rows that make a valid :class:`Transaction` are yielded; the rest are counted in
    :attr:`skipped` and, by the name of the offending column, in :attr:`skip_reasons` (blank
    lines are ignored, not counted). A counting iterator rather than a generator return value
    so that ordinary ``for`` loops and ``itertools`` keep working and the counts can be read
    at any time. Amounts are rounded to cents, which also removes the reference data set's
    label leak (fraud amounts with ten and more decimals). Use it as a context manager, or
    exhaust it, to release the file.
    """

    def __init__(self, path: Path, fmt: str, columns: dict[str, int], branch: str,
                 sort_by_time: bool) -> None:
        self.path = path
        self.format = fmt
        self.branch = branch
        self.rows = 0
        self.yielded = 0
        self.skipped = 0
        self.skip_reasons: Counter[str] = Counter()
        rows = self._rows(columns)
        self._it: Iterator[Labelled] = (
            iter(sorted(rows, key=lambda item: item.tx.timestamp)) if sort_by_time else rows)

    def __iter__(self) -> Replay:
        return self

    def __next__(self) -> Labelled:
        item = next(self._it)
        self.yielded += 1
        return item

    def close(self) -> None:
        """Release the file early (a partially read replay otherwise holds it open)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] += 1

    def _rows(self, columns: dict[str, int]) -> Iterator[Labelled]:
        convert = self._reference if self.format == "reference" else self._handbook
        width = max(columns.values()) + 1
        with _open_csv(self.path) as fh:
            reader = csv.reader(fh)
            next(reader, None)
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                self.rows += 1
                if len(row) < width:
                    self._skip("columns")
                    continue
                item = convert(row, columns)
                if item is not None:
                    yield item

    def _reference(self, row: list[str], c: dict[str, int]) -> Labelled | None:
        """Reference system rows have no terminal or channel: a terminal per location, POS."""
        tx_id = sanitise_id(row[c["transaction_id"]])
        if tx_id is None:
            self._skip("transaction_id")
            return None
        account = sanitise_id(row[c["account_id"]])
        if account is None:
            self._skip("account_id")
            return None
        try:
            ts = _timestamp(row[c["timestamp"]])
        except ValueError:
            self._skip("timestamp")
            return None
        amount = _amount(row[c["amount"]])
        if amount is None:
            self._skip("amount")
            return None
        fraud = _flag(row[c["is_fraud"]])
        if fraud is None:
            self._skip("is_fraud")
            return None
        location = _text(row[c["location"]])
        terminal = ("T-" + (_slug(location) or "unknown") if location else "T-unknown")[:64]
        tx = Transaction(transaction_id=tx_id, account_id=account, amount=amount,
                         currency="EUR", timestamp=ts, terminal_id=terminal,
                         channel="POS", merchant_category=_text(row[c["merchant_category"]]),
                         location=location)
        return Labelled(tx, fraud, "reference" if fraud else None)

    def _handbook(self, row: list[str], c: dict[str, int]) -> Labelled | None:
        """Handbook rows: prefixed ids, naive datetimes in UTC, TX_FRAUD only as the label."""
        raw = sanitise_id(row[c["TRANSACTION_ID"]])
        if raw is None or len(raw) > 63:
            self._skip("TRANSACTION_ID")
            return None
        customer = sanitise_id(row[c["CUSTOMER_ID"]])
        if customer is None or len(customer) > 63:
            self._skip("CUSTOMER_ID")
            return None
        terminal = sanitise_id(row[c["TERMINAL_ID"]])
        if terminal is None or len(terminal) > 63:
            self._skip("TERMINAL_ID")
            return None
        try:
            ts = _timestamp(row[c["TX_DATETIME"]])
        except ValueError:
            self._skip("TX_DATETIME")
            return None
        amount = _amount(row[c["TX_AMOUNT"]])
        if amount is None:
            self._skip("TX_AMOUNT")
            return None
        fraud = _flag(row[c["TX_FRAUD"]])
        if fraud is None:
            self._skip("TX_FRAUD")
            return None
        typology: str | None = None
        if fraud:
            try:
                scenario = int(float(row[c["TX_FRAUD_SCENARIO"]]))
            except ValueError:
                scenario = -1
            typology = _HANDBOOK_SCENARIOS.get(scenario, "unknown")
        tx = Transaction(transaction_id=f"H{raw}", account_id=f"C{customer}", amount=amount,
                         currency="EUR", timestamp=ts, terminal_id=f"T{terminal}",
                         channel="POS")
        return Labelled(tx, fraud, typology)


def replay_csv(path: Path | str, *, branch: str = "BR001", sort_by_time: bool = False) -> Replay:
    """Replay a reference-system or Fraud Detection Handbook CSV (plain or gzip) as labelled
    transactions.

    The format is detected from the header (column order is free, extra columns are
    ignored); an unknown header raises :class:`BranchguardError` at once, with the supported
    headers in the hint. Rows come in file order unless ``sort_by_time`` (which reads the whole
    file first; the reference data set is not in time order). The returned :class:`Replay`
    is an ``Iterator[Labelled]`` that counts skipped rows. ``branch`` is validated only: the
    caller publishes under it.
    """
    require_identifier(branch, "branch")
    path = Path(path)
    fmt, columns = _detect(path)
    return Replay(path, fmt, columns, branch, sort_by_time)
