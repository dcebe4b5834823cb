"""Partitions of the TX stream by account: which partition an account is in, the stream's
subject transform that writes it into each stored subject, and the consumer filters of a set
of partitions.

Terminals publish on ``tx.<branch>.<terminal>.<account>`` whatever the partition count (their
contract does not change). With ``partitions`` N above 1 the TX stream stores each such
message as ``txp.<p>.<branch>.<terminal>.<account>``, where ``p`` is computed by nats-server
itself (``{{partition(N,3)}}``: FNV-1a-32 of the account token's bytes, mod N), so the
partition of a message is decided once, by the server, before any scorer sees it, and a
scorer owning partition ``p`` consumes ``txp.<p>.>``. :func:`partition` is the same function
in Python (tests/test_partitions.py checks it against a real server), used to check that a
stored subject's partition is its account's. A subject the transform does not match (not
four tokens) is stored as it came; partition 0's consumer takes those too, so a malformed
message is still dead-lettered by exactly one scorer.

N is fixed when the stream is created: a different N maps the same account elsewhere, and
the per-account state a scorer holds would be split between two owners
(:func:`stream_partitions` reads N back, and streams.ensure_streams refuses a change).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from nats.js.api import SubjectTransform

from ..errors import SettingsError
from ..transaction import partition, terminal_subject

__all__ = ["filter_subjects", "partition", "stream_partitions", "terminal_subject",
           "transform"]

TERMINAL_SOURCE = "tx.*.*.*"
"""What the transform maps: the terminal contract's four-token subject."""
PARTITIONED_PREFIX = "txp"
UNPARTITIONED_FILTER = "tx.>"
"""What a partitioned stream stores untransformed (subjects that are not four tokens):
consumed with partition 0."""

_DESTINATION = re.compile(r"^txp\.\{\{\s*partition\(\s*(\d+)\s*,\s*3\s*\)\s*\}\}\."
                          r"\{\{\s*wildcard\(1\)\s*\}\}\.\{\{\s*wildcard\(2\)\s*\}\}\."
                          r"\{\{\s*wildcard\(3\)\s*\}\}$")


def transform(partitions: int) -> SubjectTransform | None:
    """The TX stream's subject transform for ``partitions``; None for 1 (no transform: the
    stream stores what terminals publish, as before issue 19)."""
    if partitions == 1:
        return None
    return SubjectTransform(
        src=TERMINAL_SOURCE,
        dest=f"{PARTITIONED_PREFIX}.{{{{partition({partitions},3)}}}}."
             "{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}")


def stream_partitions(existing: SubjectTransform | None) -> int | None:
    """The partition count a TX stream was created with, read from its transform: 1 when it
    has none, None when it has one that is not ours (so it cannot be said)."""
    if existing is None or not existing.dest:
        return 1
    found = _DESTINATION.match(existing.dest)
    if found is None or existing.src != TERMINAL_SOURCE:
        return None
    return int(found.group(1))


def check_partition_set(owned: Iterable[int], partitions: int) -> frozenset[int]:
    """``owned`` as a set, or a SettingsError naming a partition outside 0..partitions-1 (or
    an empty set: a consumer of nothing)."""
    chosen = frozenset(owned)
    wrong = sorted(p for p in chosen if not 0 <= p < partitions)
    if wrong or not chosen:
        raise SettingsError("partitions to consume must be some of 0..partitions-1",
                            field="partitions", value=sorted(chosen),
                            hint=f"the TX stream has {partitions} partition(s)")
    return chosen


def filter_subjects(owned: Iterable[int], partitions: int) -> list[str]:
    """The subjects a consumer of partitions ``owned`` (of ``partitions``) filters on: one
    ``txp.<p>.>`` per partition, in order, plus ``tx.>`` with partition 0 (what the
    transform left alone: malformed subjects, dead-lettered by partition 0's owner)."""
    chosen = check_partition_set(owned, partitions)
    subjects = [f"{PARTITIONED_PREFIX}.{p}.>" for p in sorted(chosen)]
    if 0 in chosen:
        subjects.append(UNPARTITIONED_FILTER)
    return subjects
