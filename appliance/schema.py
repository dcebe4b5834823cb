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


# --- issue 3: labels, kept apart from transactions (see labels.py) --------------------------
@migrations()
def m002_labels(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE labels (
            transaction_id TEXT PRIMARY KEY,  -- a transaction keeps its first label
            label INTEGER NOT NULL CHECK (label IN (0, 1)),  -- 1 = fraud
            known_at TEXT NOT NULL,           -- when it became known, UTC RFC 3339
            source TEXT NOT NULL,             -- file name, analyst, chargeback feed...
            imported_at TEXT NOT NULL         -- UTC RFC 3339
        );
        CREATE INDEX labels_known_at ON labels (known_at);
        """
    )


# --- issue 3: explanations of alerts (see explain.py) ---------------------------------------
@migrations()
def m003_alert_explanations(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE alert_explanations (
            transaction_id TEXT PRIMARY KEY REFERENCES alerts (transaction_id),
            explanation TEXT NOT NULL,  -- JSON: rules, unusual (sentences), contributions
            created_at REAL NOT NULL
        );
        """
    )


# --- issue 3: shadow model scores, stored beside the live verdicts, never acted on ----------
@migrations()
def m004_shadow_scores(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE shadow_scores (
            transaction_id TEXT NOT NULL REFERENCES transactions (transaction_id),
            model_version TEXT NOT NULL,
            model_risk REAL NOT NULL,
            risk REAL NOT NULL,        -- what the verdict's risk would have been
            decision TEXT NOT NULL,    -- ...and its decision; never published or alerted
            PRIMARY KEY (transaction_id, model_version)
        );
        """
    )


# --- issue 3: drift runs, one row per feature (and the risk score) per run ------------------
@migrations()
def m005_drift_reports(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE drift_reports (
            run_at REAL NOT NULL,
            model_version TEXT NOT NULL,
            window_from REAL NOT NULL,  -- event time, seconds since the epoch
            window_to REAL NOT NULL,
            rows INTEGER NOT NULL,
            name TEXT NOT NULL,         -- a feature, or 'risk'
            psi REAL NOT NULL,
            reference TEXT NOT NULL     -- what the window was compared with
        );
        CREATE INDEX drift_reports_run ON drift_reports (run_at);
        """
    )


def migrate(db: Database) -> None:
    """Bring ``db`` up to the current schema (idempotent)."""
    migrations.apply(db)
