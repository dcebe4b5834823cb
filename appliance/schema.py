"""The database schema: the only place it lives, as sqlite-utils Migrations.

Add a migration to change it; never edit one that has shipped. ``transactions`` is in rowid
order of processing, which is the order feature state is rebuilt in.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("branchguard")


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE transactions (
            transaction_id TEXT PRIMARY KEY,
            stream_seq INTEGER NOT NULL,
            branch TEXT NOT NULL,
            account_id TEXT NOT NULL,
            terminal_id TEXT NOT NULL,
            amount REAL NOT NULL,
            amount_milli INTEGER NOT NULL,
            currency TEXT NOT NULL,
            ts REAL NOT NULL,               -- event time, seconds since the Unix epoch
            utc_offset INTEGER NOT NULL,    -- the timestamp's offset as sent, in seconds
            channel TEXT NOT NULL,
            merchant_category TEXT,
            location TEXT,
            features TEXT NOT NULL,         -- JSON array in the order of FEATURES of...
            features_version TEXT NOT NULL, -- ...this version (features.FEATURES_VERSION)
            model_risk REAL NOT NULL,
            risk REAL NOT NULL,
            severity TEXT NOT NULL,
            decision TEXT NOT NULL,
            reasons TEXT NOT NULL,          -- JSON list of reason codes
            details TEXT NOT NULL,          -- JSON list of sentences, one per reason
            model_version TEXT NOT NULL,
            rules_version TEXT NOT NULL,
            stored_at REAL NOT NULL
        );
        CREATE INDEX transactions_account_ts ON transactions (account_id, ts);
        CREATE INDEX transactions_ts ON transactions (ts);

        CREATE TABLE alerts (
            alert_id INTEGER PRIMARY KEY,
            transaction_id TEXT NOT NULL UNIQUE REFERENCES transactions (transaction_id),
            created_at REAL NOT NULL,
            ts REAL NOT NULL,
            account_id TEXT NOT NULL,
            terminal_id TEXT NOT NULL,
            severity TEXT NOT NULL,
            risk REAL NOT NULL,
            reasons TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'NEW',
            assignee TEXT,
            updated_at REAL NOT NULL,
            version INTEGER NOT NULL DEFAULT 1
        );
        CREATE INDEX alerts_status_severity ON alerts (status, severity);
        CREATE INDEX alerts_created ON alerts (created_at);

        CREATE TABLE dead_letters (
            stream_seq INTEGER PRIMARY KEY,
            subject TEXT NOT NULL,
            reason TEXT NOT NULL,
            size INTEGER NOT NULL,
            received_at REAL NOT NULL
        );

        -- The last TX stream sequence whose outcome (stored or dead-lettered) is committed,
        -- per consumer. The consumer restarts from here, so a crash replays in stream order.
        CREATE TABLE checkpoints (
            consumer TEXT PRIMARY KEY,
            stream_seq INTEGER NOT NULL,
            updated_at REAL NOT NULL
        );
        """
    )


# --- issue 6: alerts outbox -----------------------------------------------------------------
@migrations()
def m002_alerts_outbox(db: Database) -> None:
    """The alert outbox: one row per alert, written by the scorer in the same transaction as
    the alert (so an alert is never lost or sent before it is stored), and the dispatcher's
    per-destination delivery state (``branchguard alerts run``; see docs/alerts.md)."""
    db.executescript(
        """
        -- Append-only. Alert ids only grow and commits are in id order (one writer), so
        -- the dispatcher keeps one cursor instead of marking each row.
        CREATE TABLE alert_outbox (
            alert_id INTEGER PRIMARY KEY REFERENCES alerts (alert_id)
        );
        CREATE TABLE alert_outbox_cursor (
            dispatcher TEXT PRIMARY KEY,
            routed_upto INTEGER NOT NULL,   -- every outbox row up to here has its deliveries
            updated_at REAL NOT NULL
        );

        -- One row per alert and destination (a destination is one Apprise service, keyed by
        -- a hash of its URL so that no secret is stored). state: pending, sent or failed.
        CREATE TABLE alert_deliveries (
            destination TEXT NOT NULL,
            alert_id INTEGER NOT NULL REFERENCES alerts (alert_id),
            digest INTEGER NOT NULL,        -- 1: goes out in the periodic digest (WARNING)
            due_at REAL NOT NULL,           -- not sent before this time
            created_at REAL NOT NULL,       -- the alert's; its age decides when it fails
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            sent_at REAL,
            PRIMARY KEY (destination, alert_id)
        ) WITHOUT ROWID;
        CREATE INDEX alert_deliveries_pending ON alert_deliveries (destination, digest, due_at)
            WHERE state = 'pending';
        CREATE INDEX alert_deliveries_failed ON alert_deliveries (state) WHERE state = 'failed';

        -- What each destination key stands for, for people: the URL with secrets masked.
        CREATE TABLE alert_destinations (
            destination TEXT PRIMARY KEY,
            label TEXT NOT NULL
        );
        """
    )


def migrate(db: Database) -> None:
    """Bring ``db`` up to the current schema (idempotent)."""
    migrations.apply(db)
