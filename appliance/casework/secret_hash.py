"""Argon2 hashes of secrets (console passwords, API keys), and a bound on how many are
verified at once.

One verification costs tens to a couple of hundred milliseconds of CPU (argon2-cffi's
defaults: 64 MiB, 3 passes; ~170 ms measured on the 2-core test machine) and releases the
GIL, so verifications running side by side (a flood of wrong secrets) would take every core
from everything else on the node, the scorer included. At most :data:`VERIFY_SLOTS` run at
once in a process, one fewer than the machine's cores and at least one; the others wait for
a slot. Callers run verification off the event loop (the API in its thread pool, the console
with ``run.io_bound``), so waiting never blocks other requests.
"""

from __future__ import annotations

import os
import threading

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

VERIFY_SLOTS = max(1, (os.cpu_count() or 2) - 1)
"""Argon2 verifications that may run at once in one process."""
_hasher = PasswordHasher()
_slots = threading.BoundedSemaphore(VERIFY_SLOTS)


def hash_secret(secret: str) -> str:
    """An argon2id hash of ``secret`` (salted: two calls give different hashes)."""
    return _hasher.hash(secret)


def verify_secret(digest: str, secret: str) -> bool:
    """Whether ``secret`` matches ``digest``; waits for one of the :data:`VERIFY_SLOTS`.
    A malformed digest is a mismatch, never an error."""
    with _slots:
        try:
            return _hasher.verify(digest, secret)
        except (VerificationError, InvalidHashError):
            return False
