"""One error base for everything Branchguard raises on purpose.

Each subclass names what went wrong in terms an operator can act on: the field or setting,
the offending value, and a hint saying what to do. The CLI prints ``str(error)`` and exits
non-zero; nothing here is meant to be caught and ignored.
"""

from __future__ import annotations


class BranchguardError(Exception):
    """Base class: a problem the operator can fix, with a hint saying how."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value
        self.hint = hint

    def __str__(self) -> str:
        text = self.message
        if self.field is not None:
            text = f"{self.field}: {text}"
            if self.value is not None:
                text = f"{text} (got {self.value!r})"
        if self.hint:
            text = f"{text} (hint: {self.hint})"
        return text


class SettingsError(BranchguardError):
    """A setting is missing, malformed or out of range."""


class ModelError(BranchguardError):
    """The model file or its card is missing, corrupt or does not match the features."""


class NodeError(BranchguardError):
    """A child process (nats-server) or the NATS connection could not be brought up."""


class StreamError(NodeError):
    """A JetStream stream exists with a configuration the settings cannot change (the TX
    stream's partition count, issue 19)."""


class StoreError(BranchguardError):
    """The SQLite database could not be opened or migrated."""


class FencedError(BranchguardError):
    """A partition's owner tried to write after losing its lease (issue 19): the write is
    refused, and the owner must stop; the partition's next owner carries on from its
    checkpoint."""


# --- issue 7: retention ---------------------------------------------------------------


class ArchiveError(BranchguardError):
    """An archive file is missing, corrupt, or does not match what it was copied from."""


class RetentionError(BranchguardError):
    """A move could not be verified, or a request breaks a rule (erasing a held account)."""
