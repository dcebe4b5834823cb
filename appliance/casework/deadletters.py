"""Dead letters people can read, and re-submit once the cause is fixed.

A message the scorer refuses (malformed, against the contract, or failing to score) goes to
the ``TX_DLQ`` stream and, with the batch it arrived in, to the ``dead_letters`` table:
its ``TX`` stream sequence, subject, reason, size, when, and its body up to
``MAX_MESSAGE_BYTES`` (anything longer was refused as oversize; ``size`` says how long it
was). The database is the record read here: it is replicated and kept, where ``TX_DLQ``
keeps a body 30 days on the node only.

Re-submitting publishes the stored body (or a corrected one) to ``TX`` on the message's
original subject (as the terminal sent it: a partitioned stream's ``txp.<p>.`` is dropped,
and the server partitions it again), after checking it against the contract, so a fix goes
through the scorer like any transaction. Each re-submission is a row of ``dead_letter_resubmissions`` and an
audit entry, written *before* the publish: a dead letter is re-submitted at most once
unless asked again (``again``), even when a run dies between the two. Its ``Nats-Msg-Id``
(``dlq-<seq>-resubmit-<attempt>``) differs from the terminal's, so JetStream's duplicate
window does not swallow it; the scorer still answers a transaction id it already stored
with that transaction's first verdict, never scoring it twice.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

from .. import audit
from ..change import apply_change, migrated_writer
from ..errors import BranchguardError
from ..settings import Settings
from ..transaction import MAX_MESSAGE_BYTES, Malformed, parse, terminal_subject

RESUBMITTED_FROM = "Branchguard-Resubmitted-From"
"""Header naming the dead letter (its TX stream sequence) a re-submitted message repeats."""
LIMIT = 500
_HIDDEN = frozenset({"Cc", "Cf", "Co", "Cs", "Zl", "Zp"})
_SELECT = "SELECT stream_seq, subject, reason, size, received_at, body FROM dead_letters "


class DeadLetterError(BranchguardError):
    """No such dead letter, or one that cannot be re-submitted as asked."""


@dataclass(frozen=True)
class Resubmission:
    """One re-submission of a dead letter, and what came of it."""

    stream_seq: int
    attempt: int
    at: float
    actor: str
    body_sha256: str
    edited: bool
    tx_stream_seq: int | None
    """Where JetStream stored it in TX; None when it failed or its outcome is not known."""
    error: str | None

    @property
    def outcome(self) -> str:
        if self.tx_stream_seq is not None:
            return f"published as TX sequence {self.tx_stream_seq}"
        return f"failed: {self.error}" if self.error else "outcome not known"

    def as_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "at": self.at, "actor": self.actor,
                "body_sha256": self.body_sha256, "edited": self.edited,
                "tx_stream_seq": self.tx_stream_seq, "error": self.error,
                "outcome": self.outcome}


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter as people read it."""

    stream_seq: int
    subject: str
    reason: str
    size: int
    received_at: float
    body: bytes | None
    """As received, up to MAX_MESSAGE_BYTES; None when dead-lettered before bodies were
    kept (``TX_DLQ`` has it while it keeps it)."""
    resubmissions: tuple[Resubmission, ...] = ()

    @property
    def truncated(self) -> bool:
        return self.body is not None and len(self.body) < self.size

    @property
    def resubmitted(self) -> bool:
        """Whether a re-submission was published, or may have been (outcome not known)."""
        return any(r.error is None for r in self.resubmissions)

    def body_text(self) -> str | None:
        """The body as text when it is UTF-8 (what the contract asks for), else None."""
        if self.body is None:
            return None
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def as_dict(self, body: bool = True) -> dict[str, Any]:
        """JSON-ready: the body as ``body`` (text) when it is UTF-8, else ``body_base64``."""
        out: dict[str, Any] = {
            "stream_seq": self.stream_seq, "subject": self.subject, "reason": self.reason,
            "size": self.size, "received_at": self.received_at,
            "body_recorded": self.body is not None, "truncated": self.truncated,
            "resubmitted": self.resubmitted,
            "resubmissions": [r.as_dict() for r in self.resubmissions]}
        if body:
            text = self.body_text()
            out["body"] = text
            out["body_base64"] = (base64.b64encode(self.body).decode()
                                  if self.body is not None and text is None else None)
        return out


def printable(text: str) -> str:
    """``text`` with every control and format character other than newline and tab written
    as ``\\uXXXX``: a dead letter is what an attacker may have sent, and a NUL, a bell or a
    right-to-left override shown as itself would hide or reorder what a person reads."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) not in _HIDDEN
                   else f"\\u{ord(c):04x}" for c in text)


def listing(conn: sqlite3.Connection, *, before_seq: int | None = None,
            reason: str | None = None, limit: int = 100) -> list[DeadLetter]:
    """Dead letters newest first (by stream sequence), below ``before_seq`` when given (the
    next page starts below the last one shown), whose reason contains ``reason``."""
    limit = max(1, min(limit, LIMIT))
    rows = conn.execute(_SELECT + "WHERE stream_seq < ?1 AND (?2 IS NULL OR "
                        "instr(lower(reason), lower(?2)) > 0) ORDER BY stream_seq DESC "
                        "LIMIT ?3", (2**63 - 1 if before_seq is None else before_seq,
                                     reason or None, limit)).fetchall()
    found = _resubmissions(conn, [int(r[0]) for r in rows])
    return [_letter(r, found.get(int(r[0]), ())) for r in rows]


def show(conn: sqlite3.Connection, stream_seq: int) -> DeadLetter:
    """The dead letter of TX stream sequence ``stream_seq``, with its re-submissions."""
    row = conn.execute(_SELECT + "WHERE stream_seq = ?", (stream_seq,)).fetchone()
    if row is None:
        raise DeadLetterError("no dead letter has this stream sequence", field="stream_seq",
                              value=stream_seq, hint="`branchguard deadletters list` shows them")
    return _letter(row, _resubmissions(conn, [stream_seq]).get(stream_seq, ()))


def _letter(row: tuple[Any, ...], resubmissions: tuple[Resubmission, ...]) -> DeadLetter:
    seq, subject, reason, size, received_at, body = row
    return DeadLetter(int(seq), subject, reason, int(size), float(received_at),
                      None if body is None else bytes(body), resubmissions)


def _resubmissions(conn: sqlite3.Connection, seqs: list[int]
                   ) -> dict[int, tuple[Resubmission, ...]]:
    if not seqs:
        return {}
    found: dict[int, list[Resubmission]] = {}
    for r in conn.execute(
            "SELECT stream_seq, attempt, at, actor, body_sha256, edited, tx_stream_seq, error "
            "FROM dead_letter_resubmissions WHERE stream_seq IN (SELECT value FROM "
            "json_each(?)) ORDER BY stream_seq, attempt", (json.dumps(seqs),)):
        found.setdefault(int(r[0]), []).append(
            Resubmission(int(r[0]), int(r[1]), float(r[2]), r[3], r[4], bool(r[5]), r[6], r[7]))
    return {seq: tuple(items) for seq, items in found.items()}


# --- re-submitting ------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """A re-submission claimed in the database, ready to publish."""

    letter: DeadLetter
    attempt: int
    body: bytes
    msg_id: str


def claim(conn: sqlite3.Connection, stream_seq: int, actor: str, body: bytes | None = None,
          again: bool = False) -> Plan:
    """Check that dead letter ``stream_seq`` can be re-submitted with ``body`` (default:
    its stored body) and record the attempt and its audit entry; call inside a change
    (change.py). Refuses, naming why: no such dead letter; already re-submitted (or
    perhaps: a run that died before knowing) unless ``again``; no whole stored body and no
    corrected one; a body the contract still refuses (nothing would be gained by
    dead-lettering it again)."""
    letter = show(conn, stream_seq)
    if letter.resubmitted and not again:
        last = [r for r in letter.resubmissions if r.error is None][-1]
        raise DeadLetterError(
            f"already re-submitted by {last.actor} (attempt {last.attempt}, {last.outcome})",
            field="stream_seq", value=stream_seq,
            hint="pass --again to re-submit it once more on purpose")
    edited = body is not None
    if body is None:
        if letter.body is None:
            raise DeadLetterError(
                "its body was not recorded (dead-lettered before bodies were kept)",
                field="stream_seq", value=stream_seq,
                hint="give the corrected message with --body FILE; the TX_DLQ stream keeps "
                     "the original 30 days")
        if letter.truncated:
            raise DeadLetterError(
                f"only the first {len(letter.body)} of its {letter.size} bytes were kept "
                f"(over {MAX_MESSAGE_BYTES}, the contract refuses it anyway)",
                field="stream_seq", value=stream_seq,
                hint="give the corrected message with --body FILE")
        body = letter.body
    checked = parse(terminal_subject(letter.subject), body)
    if isinstance(checked, Malformed):
        raise DeadLetterError(f"the contract still refuses it: {checked.reason}",
                              field="body", value=stream_seq,
                              hint="correct it and pass it with --body FILE "
                                   "(see docs/transactions.md)")
    attempt = 1 + max((r.attempt for r in letter.resubmissions), default=0)
    digest = hashlib.sha256(body).hexdigest()
    conn.execute(
        "INSERT INTO dead_letter_resubmissions (stream_seq, attempt, at, actor, body_sha256, "
        "edited) VALUES (?, ?, ?, ?, ?, ?)",
        (stream_seq, attempt, time.time(), actor, digest, int(edited)))
    audit.append(conn, actor, "dead_letter.resubmit", f"dead_letter:{stream_seq}",
                 {"reason": letter.reason, "subject": letter.subject,
                  "resubmissions": len(letter.resubmissions)},
                 {"attempt": attempt, "body_sha256": digest, "edited": edited,
                  "transaction_id": checked.transaction_id})
    return Plan(letter, attempt, body, f"dlq-{stream_seq}-resubmit-{attempt}")


def record_outcome(conn: sqlite3.Connection, plan: Plan, tx_stream_seq: int | None,
                   error: str | None) -> None:
    """What came of publishing ``plan``: its TX stream sequence, or why it failed (a failed
    attempt does not count as re-submitted). Call inside a change."""
    conn.execute("UPDATE dead_letter_resubmissions SET tx_stream_seq = ?, error = ? "
                 "WHERE stream_seq = ? AND attempt = ?",
                 (tx_stream_seq, error, plan.letter.stream_seq, plan.attempt))


async def resubmit(settings: Settings, stream_seq: int, actor: str, body: bytes | None = None,
                   again: bool = False) -> Resubmission:
    """Re-submit dead letter ``stream_seq`` to the node's TX stream (see the module doc):
    claim it, publish it on its original subject, record where it went. Raises
    :class:`DeadLetterError` when refused, and after recording a failed publish."""
    from ..nats_auth import client_options
    from ..scoring.ingest import connect

    writer = migrated_writer(settings.db_path)
    try:
        plan = apply_change(writer, lambda conn: claim(conn, stream_seq, actor, body, again))
        url = settings.nats_url or f"nats://127.0.0.1:{settings.nats_port}"
        seq: int | None = None
        error: str | None = None
        try:
            nc = await connect(url, "branchguard-deadletters", **client_options(settings))
        except BranchguardError as exc:
            error = str(exc)
        else:
            try:
                ack = await nc.jetstream().publish(  # a partitioned stream partitions it
                    terminal_subject(plan.letter.subject), plan.body, timeout=10.0,
                    headers={"Nats-Msg-Id": plan.msg_id,
                             RESUBMITTED_FROM: str(stream_seq)})
                seq = int(ack.seq)
            except Exception as exc:  # noqa: BLE001 - any failure to publish is recorded
                error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            finally:
                await nc.close()
        apply_change(writer, lambda conn: record_outcome(conn, plan, seq, error))
        if error is not None:
            raise DeadLetterError(f"not re-submitted: {error}", field="nats_url", value=url,
                                  hint="is the node's NATS running? The attempt is recorded "
                                       "as failed; run the command again")
        return show(writer.conn, stream_seq).resubmissions[-1]
    finally:
        writer.close()
