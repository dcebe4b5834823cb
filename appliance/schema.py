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


# --- issue 4: analyst API (cases, notes, API keys, audit trail, allow/deny lists) ----------

@migrations()
def m003_cases(db: Database) -> None:
    """The analyst API's tables. The alert's case state (status, assignee, version) is in
    ``alerts`` since m001; this adds who changed it last and the disposition (status +
    time + who), so labels can be read from closed alerts without the audit trail."""
    db.executescript(
        """
        ALTER TABLE alerts ADD COLUMN updated_by TEXT;
        ALTER TABLE alerts ADD COLUMN disposed_at REAL;  -- set on CONFIRMED_FRAUD /
        ALTER TABLE alerts ADD COLUMN disposed_by TEXT;  -- FALSE_POSITIVE, cleared on reopen
        CREATE INDEX alerts_account ON alerts (account_id, status);
        CREATE INDEX alerts_terminal ON alerts (terminal_id, status);
        CREATE INDEX alerts_risk ON alerts (risk);
        CREATE INDEX alerts_disposed ON alerts (disposed_at) WHERE disposed_at IS NOT NULL;

        CREATE TABLE alert_notes (
            note_id INTEGER PRIMARY KEY,
            alert_id INTEGER NOT NULL REFERENCES alerts (alert_id),
            at REAL NOT NULL,
            author TEXT NOT NULL,
            text TEXT NOT NULL
        );
        CREATE INDEX alert_notes_alert ON alert_notes (alert_id);

        -- Bumped in the same transaction as every API write: part of the response cache key.
        CREATE TABLE api_generation (id INTEGER PRIMARY KEY CHECK (id = 1),
                                     value INTEGER NOT NULL);
        INSERT INTO api_generation (id, value) VALUES (1, 0);

        -- Only an argon2 hash of each key; key_id is the key's non-secret prefix.
        CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('viewer', 'analyst', 'supervisor', 'admin')),
            hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT NOT NULL,
            revoked_at REAL,
            revoked_by TEXT
        );

        -- Append-only and hash-chained: hash = sha256(canonical JSON of the entry with
        -- prev_hash). The triggers stop accidents; the chain detects deliberate edits.
        CREATE TABLE audit_log (
            seq INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            subject TEXT NOT NULL,
            before TEXT,               -- JSON, null when the subject is new
            after TEXT,                -- JSON, null when the subject is gone
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
            BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
        CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
            BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

        CREATE TABLE list_entries (
            entry_id INTEGER PRIMARY KEY,
            list TEXT NOT NULL CHECK (list IN ('allow', 'deny')),
            kind TEXT NOT NULL CHECK (kind IN ('account', 'terminal')),
            value TEXT NOT NULL,
            reason TEXT NOT NULL,
            owner TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL,
            removed_at REAL,
            removed_by TEXT
        );
        CREATE INDEX list_entries_active ON list_entries (kind, value) WHERE removed_at IS NULL;
        """
    )


# --- issue 7: retention ---------------------------------------------------------------


@migrations()
def m004_retention(db: Database) -> None:
    db.executescript(
        """
        -- Accounts whose data no tier may purge or erase (a court order, an investigation).
        CREATE TABLE legal_holds (
            account_id TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            placed_at REAL NOT NULL
        );
        -- One row per right-to-erasure request carried out. The account is kept only as a
        -- SHA-256 digest: proof that it was erased, without keeping who it was.
        CREATE TABLE erasures (
            erasure_id INTEGER PRIMARY KEY,
            account_sha256 TEXT NOT NULL,
            erased_at REAL NOT NULL,
            transactions INTEGER NOT NULL,
            alerts INTEGER NOT NULL
        );
        """
    )


# --- issue 5: analyst console (local users with argon2-hashed passwords) -------------------

@migrations()
def m005_users(db: Database) -> None:
    """Console users: the API's roles, an argon2 hash of the password, soft disable.
    ``password_changed_at`` is copied into each session, so a new password ends the
    sessions opened with the old one."""
    db.executescript(
        """
        CREATE TABLE console_users (
            username TEXT PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('viewer', 'analyst', 'supervisor', 'admin')),
            hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT NOT NULL,
            password_changed_at REAL NOT NULL,
            disabled_at REAL,
            disabled_by TEXT
        );
        """
    )


# --- issue 3: labels, kept apart from transactions (see labels.py) --------------------------
@migrations()
def m006_labels(db: Database) -> None:
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
def m007_alert_explanations(db: Database) -> None:
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
def m008_shadow_scores(db: Database) -> None:
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
def m009_drift_reports(db: Database) -> None:
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


# --- issue 5: the terminal directory (names and places of terminals, for the case map) ------
@migrations()
def m010_terminals(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE terminals (
            terminal_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            branch TEXT NOT NULL,
            latitude REAL,              -- WGS 84 degrees; both NULL: no fixed place (online)
            longitude REAL,
            updated_at REAL NOT NULL
        );
        """
    )


# --- issue 17: amounts sent in another currency than the node's ----------------------------
@migrations()
def m011_sent_amount(db: Database) -> None:
    """A transaction sent in another currency is stored converted (``amount``, ``currency``
    are the node's: what the rules judged and the features summed); what the terminal sent
    is kept beside it. Both NULL: it was sent in the node's currency."""
    db.executescript(
        """
        ALTER TABLE transactions ADD COLUMN sent_amount REAL;
        ALTER TABLE transactions ADD COLUMN sent_currency TEXT;
        """
    )


# --- issue 16: the hot path (verdicts published before the commit) -------------------------
@migrations()
def m012_verdict_of_record(db: Database) -> None:
    """What the scorer needs to keep a published verdict the verdict of record across a crash
    between publishing and committing (see scoring/pipeline.py), and to tell a re-send from a
    conflicting one (a re-used transaction id with another body).

    ``features`` may now hold a binary blob (``store.encode_features``) as well as the JSON
    text of older rows; readers go through ``store.decode_features``.
    """
    db.executescript(
        """
        -- blake2b-128 of the transaction's canonical body (transaction.digest); NULL on rows
        -- stored before issue 16.
        ALTER TABLE transactions ADD COLUMN body_digest BLOB;
        -- The label features the model read (float64 blob), when it reads any: with the
        -- features and the model version they rebuild the alert's explanation on demand.
        ALTER TABLE transactions ADD COLUMN label_features BLOB;
        -- VERDICTS stream sequence below which every verdict of an uncommitted transaction
        -- can not be: a restart reads VERDICTS from here and adopts what it finds. NULL: a
        -- node older than issue 16, which published only what it had committed.
        ALTER TABLE checkpoints ADD COLUMN verdict_seq INTEGER;
        -- TX stream sequence up to which every verdict is known to be in VERDICTS.
        ALTER TABLE checkpoints ADD COLUMN confirmed_seq INTEGER NOT NULL DEFAULT 0;
        -- Before issue 16 a verdict was published only after its commit, and a stop waited
        -- for the acks: what an older node committed is taken as published.
        UPDATE checkpoints SET confirmed_seq = stream_seq;
        """
    )


# --- issue 17: dead letters you can read and re-submit (see casework/deadletters.py) ---------
@migrations()
def m013_dead_letter_bodies(db: Database) -> None:
    """The body of each dead letter, kept with its reason (the database is the record: the
    ``TX_DLQ`` stream keeps bodies 30 days and is not replicated with the database), and
    each re-submission of one, so that none is re-submitted twice by accident."""
    db.executescript(
        """
        -- The message as received, up to transaction.MAX_MESSAGE_BYTES (anything longer was
        -- refused as oversize; ``size`` says how long it was). NULL: dead-lettered before
        -- bodies were kept.
        ALTER TABLE dead_letters ADD COLUMN body BLOB;

        CREATE TABLE dead_letter_resubmissions (
            stream_seq INTEGER NOT NULL REFERENCES dead_letters (stream_seq),
            attempt INTEGER NOT NULL,       -- 1, 2, ... (a second one needs --again)
            at REAL NOT NULL,
            actor TEXT NOT NULL,
            body_sha256 TEXT NOT NULL,      -- of what was published
            edited INTEGER NOT NULL,        -- 1: a corrected body, not the stored one
            tx_stream_seq INTEGER,          -- its new place in TX, once JetStream stored it
            error TEXT,                     -- why publishing failed; both NULL: not known
            PRIMARY KEY (stream_seq, attempt)
        );
        """
    )


# --- issue 18 (E): dispositions, fraud types, and labels an analyst can correct -------------
@migrations()
def m014_dispositions(db: Database) -> None:
    """A closed case's disposition code and, for fraud, its fraud type (see
    casework/dispositions.py); the typology of a fraud label; and the corrections of labels,
    in order, so the scorer's label feed can take a corrected label out of its state (see
    scoring/labels.py)."""
    db.executescript(
        """
        ALTER TABLE alerts ADD COLUMN disposition TEXT;  -- set on close, cleared on reopen
        ALTER TABLE alerts ADD COLUMN fraud_type TEXT;   -- a typology; only with fraud
        ALTER TABLE labels ADD COLUMN typology TEXT;     -- what kind of fraud; NULL: not said

        -- One row per label changed after it was first stored (an analyst re-disposing a
        -- case): what it was and what it became. Append-only; the audit trail has the same
        -- change as a ``label.correct`` entry.
        CREATE TABLE label_corrections (
            correction_id INTEGER PRIMARY KEY,
            transaction_id TEXT NOT NULL,
            label_rowid INTEGER NOT NULL,       -- the labels row (its rowid does not change)
            before_label INTEGER NOT NULL,
            before_typology TEXT,
            before_known_at TEXT NOT NULL,
            after_label INTEGER NOT NULL,
            after_typology TEXT,
            after_known_at TEXT NOT NULL,
            at TEXT NOT NULL,                   -- UTC RFC 3339
            actor TEXT NOT NULL
        );
        """
    )


# --- issue 19: partitioned scorers ------------------------------------------------------------
@migrations()
def m015_lease_token(db: Database) -> None:
    """The fencing token of the lease under which a partition's checkpoint was last written
    (see lease.py): a commit carrying a smaller token than the one stored is refused, so an
    owner that lost its partition cannot write after the next owner has."""
    db.executescript(
        """
        ALTER TABLE checkpoints ADD COLUMN lease_token INTEGER;  -- NULL: written unleased
        """
    )


@migrations()
def m016_gathered(db: Database) -> None:
    """How far each partition's database has been copied into the node's
    (operations/gather.py)."""
    db.executescript(
        """
        CREATE TABLE gathered (
            source TEXT PRIMARY KEY,            -- the partition's directory name: p0, p1, ...
            last_rowid INTEGER NOT NULL,        -- its transactions copied up to this rowid
            last_dead_seq INTEGER NOT NULL      -- its dead letters up to this stream sequence
        );
        """
    )



# --- issues 19 and 20: cases and casework between machines (casework/case_events.py) -------
@migrations()
def m017_case_flows(db: Database) -> None:
    """How far this database's alerts and casework have been sent (``case_flow_cursors``),
    and, for a list entry made elsewhere (the site's analyst host, the regional hub), where
    it came from (``origin``: ``<origin>:<entry id there>``), so its removal finds it."""
    db.executescript(
        """
        CREATE TABLE case_flow_cursors (
            flow TEXT PRIMARY KEY,           -- 'raised': alerts by alert_id;
            position INTEGER NOT NULL        -- 'worked': the audit trail by seq
        );
        ALTER TABLE list_entries ADD COLUMN origin TEXT;
        CREATE UNIQUE INDEX list_entries_origin ON list_entries (origin)
            WHERE origin IS NOT NULL;
        """
    )


@migrations()
def m018_branch_links(db: Database) -> None:
    """At a regional hub: each branch's link as the hub last saw it (casework/branch_links.py),
    and each branch's statistics per minute."""
    db.executescript(
        """
        CREATE TABLE branch_links (
            branch TEXT PRIMARY KEY,
            connected INTEGER NOT NULL,      -- 1: its leaf link is up
            since REAL NOT NULL,             -- when it last came up or went down
            lag INTEGER,                     -- cases it has that the hub has not (link up)
            last_heard REAL,                 -- the last message or heartbeat from it
            checked_at REAL NOT NULL
        );
        -- Each branch's statistics per minute (of when the branch stored its transactions),
        -- as each branch sends them (casework/case_events.py, MinuteStats).
        CREATE TABLE branch_minutes (
            branch TEXT NOT NULL,
            minute INTEGER NOT NULL,         -- epoch seconds // 60
            transactions INTEGER NOT NULL,
            declined INTEGER NOT NULL,
            alerts INTEGER NOT NULL,
            critical INTEGER NOT NULL,
            high INTEGER NOT NULL,
            warning INTEGER NOT NULL,
            dead_letters INTEGER NOT NULL,
            model_version TEXT,              -- of the minute's last transaction
            PRIMARY KEY (branch, minute)
        );
        """
    )

def migrate(db: Database) -> None:
    """Bring ``db`` up to the current schema (idempotent)."""
    migrations.apply(db)
