"""One typed, frozen settings object for the whole node.

Values are layered: the defaults below, then a TOML file (``branchguard.toml`` in the working
directory, or the file named by ``--config`` / ``BRANCHGUARD_CONFIG``), then ``BRANCHGUARD_*``
environment variables, then command-line flags. The defaults run the embedded single node with
no configuration at all. Every field is documented in ``docs/settings.md`` (a test checks it).
"""

from __future__ import annotations

import dataclasses
import re
import ipaddress
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

from .errors import SettingsError
from .transaction import iso_4217

ENV_PREFIX = "BRANCHGUARD_"
DEFAULT_CONFIG_FILE = "branchguard.toml"
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

SYNC_POLICIES = ("always", "interval")
MAX_PARTITIONS = 1024
"""Most partitions of the TX stream (each is a consumer filter and, later, a lease)."""


@dataclass(frozen=True)
class Settings:
    """Everything the node reads from configuration. Passed explicitly; there are no globals."""

    # --- where things live
    data_dir: Path = Path("var")
    """Directory for the SQLite database and the embedded nats-server's JetStream store."""
    nats_url: str | None = None
    """URL of an existing NATS server, or of several comma-separated (the servers of a
    cluster: the node connects to one and fails over to the others); unset runs an embedded
    nats-server on 127.0.0.1."""
    nats_port: int = 4222
    """Port of the embedded nats-server (0 picks a free port)."""
    branch: str = "BR001"
    """Branch identifier used by the simulator and in the node's identity."""
    models_dir: Path = SHIPPED_MODELS_DIR
    """Directory holding ONNX models and their JSON model cards."""
    model_version: str = "if-v1"
    """Version of the model to serve (``<models_dir>/<version>.onnx`` and ``.json``)."""

    # --- streams and consumer
    tx_subjects: str = "tx.>"
    """Subjects of the TX stream; the scorer's consumer filters on this too."""
    consumer: str = "scorer"
    """Durable consumer name. One scorer per consumer; scale out by partitioning subjects."""
    batch_size: int = 1000
    """Most transactions scored, stored and acked together."""
    max_deliver: int = 5
    """JetStream's redelivery limit for a message left unacked (its verdicts unconfirmed);
    messages that fail validation or scoring are dead-lettered at once instead."""
    ack_wait_seconds: float = 30.0
    """Seconds JetStream waits for an ack before redelivering."""
    duplicate_window_seconds: float = 120.0
    """JetStream duplicate window: re-sends with the same Nats-Msg-Id inside it are dropped."""
    tx_max_age_days: float = 7.0
    """How long the TX stream keeps transactions (the replay horizon after a restore)."""
    sync_policy: str = "interval"
    """Embedded nats-server fsync policy: ``interval`` (fsync every ``sync_interval_seconds``)
    or ``always`` (fsync before every ack; about 1,300 tx/s here). See docs/operations.md."""
    sync_interval_seconds: float = 1.0
    """With ``sync_policy = "interval"``: seconds between JetStream fsyncs."""

    # --- rules (the reference system's, thresholds configurable)
    high_value_amount: float = 5000.0
    """Amount at or above which the ``high_value`` rule fires (and severity is at least HIGH)."""
    risky_categories: tuple[str, ...] = ("Gambling",)
    """Merchant categories that are suspicious outside the account's usual locations."""
    deviation_multiple: float = 5.0
    """``high_deviation`` fires when amount >= this multiple of the account's mean..."""
    deviation_min_history: int = 5
    """...and the account has more than this many prior transactions."""
    ml_risk_threshold: float = 0.7
    """Model risk at or above which the ``ml_anomaly`` reason is given without the alert
    budget (``alert_budget = false``, backtests); with it, the budget decides."""

    # --- severity and decision
    critical_risk: float = 0.9
    """Risk at or above which severity is CRITICAL (decision: decline). With the alert
    budget: for hard rule hits, and the least model risk that the model alone may decline."""
    high_risk: float = 0.8
    """Risk at or above which severity is HIGH (decision: review); with the alert budget,
    for hard rule hits only."""
    warning_risk: float = 0.6
    """Risk at or above which severity is WARNING (decision: review); below it is INFO.
    With the alert budget this applies to nothing: a hard hit is at least WARNING, and the
    model alerts through the budget."""

    # --- operations
    log_level: str = "INFO"
    """Log level: DEBUG, INFO, WARNING or ERROR. Logs are one JSON object per line on stderr."""
    summary_interval_seconds: float = 2.0
    """Seconds between status lines of ``branchguard run``."""
    loop_lag_window_seconds: float = 0.0
    """Above 0: the scorer's process watches its event loop (a timer every 5 ms, and how late
    it ran) and logs one ``loop.lag`` line (INFO) per this many seconds with the window's
    largest stall and p99, in ms. 0 (the default) turns it off; ``branchguard bench`` uses 1."""
    child_restart_initial_seconds: float = 0.25
    """Seconds ``branchguard run`` waits before starting again a child that exited by itself
    (nats-server, litestream, the API, the alert dispatcher); doubled for each further exit
    of a child that had not stayed up ``child_restart_max_seconds``..."""
    child_restart_max_seconds: float = 30.0
    """...up to this many seconds between restarts."""

    # --- issue 6: alerts to chat and email (``branchguard alerts``; see docs/alerts.md)
    alerts_critical: tuple[str, ...] = ()
    """Where CRITICAL alerts go: Apprise URLs (``slack://...``, ``mailto://...``,
    ``json://...``), or tags of services in ``alerts_config``. Empty: nowhere."""
    alerts_high: tuple[str, ...] = ()
    """Where HIGH alerts go (Apprise URLs or tags), sent like CRITICAL ones."""
    alerts_warning: tuple[str, ...] = ()
    """Where WARNING alerts go (Apprise URLs or tags), as one digest every
    ``alerts_digest_interval_seconds``. INFO never raises an alert, so it goes nowhere."""
    alerts_config: Path | None = None
    """An Apprise configuration file (YAML or text) defining tagged services; the
    ``alerts_*`` severity settings name its tags, and an empty one means the tag named after
    the severity (``critical``, ``high``, ``warning``). Unset: those settings' URLs only."""
    console_url: str = "http://127.0.0.1:8080"
    """Base URL of the console; alert messages link to ``<console_url>/console/alerts/<id>``."""
    alerts_group_wait_seconds: float = 5.0
    """How long the first alert of a burst waits for others on the same account or terminal,
    to go out as one grouped message."""
    alerts_group_interval_seconds: float = 60.0
    """After a message about an account or terminal, further alerts about it wait this long
    and go out together as one message with their count."""
    alerts_rate_per_minute: float = 20.0
    """Most messages per minute to one destination; beyond it they wait (and group up)."""
    alerts_digest_interval_seconds: float = 900.0
    """Seconds between WARNING digests (aligned to the clock: every 15 minutes by default)."""
    alerts_retry_initial_seconds: float = 2.0
    """First wait after a destination fails; it doubles with each further failure..."""
    alerts_retry_max_seconds: float = 300.0
    """...up to this, with random jitter of up to half the wait."""
    alerts_max_age_seconds: float = 3600.0
    """An alert still not accepted by a destination this long after it was raised is marked
    failed there (``branchguard alerts failed``) and counted as a health warning."""
    alerts_poll_seconds: float = 0.5
    """Seconds between the dispatcher's looks at the outbox."""
    # --- analyst API (issue 4)
    api_host: str = "127.0.0.1"
    """Address ``branchguard serve`` listens on (keep it on loopback behind a TLS proxy)."""
    api_port: int = 8080
    """Port of the analyst API (0 picks a free port; the log line ``api.listening`` says which)."""
    run_api: bool = True
    """Whether ``branchguard run`` also starts the API server as a child process."""
    api_rate_per_second: float = 100.0
    """Requests per second allowed per API key (per client address without a key)..."""
    api_rate_burst: int = 200
    """...counted over a moving window of ``round(api_rate_burst / api_rate_per_second)``
    seconds (at least 1): up to this many requests may come at once."""
    api_verifications_per_minute: int = 60
    """Argon2 key verifications one client address may cause per minute (wrong keys, and
    keys not verified in the last ``api_key_cache_seconds``), counted before the hash check;
    over it: 429 at once. Keys that have passed before in this process do not count. Behind
    a proxy every client shares its address: allow a couple per active key and minute."""
    api_key_attempts_per_minute: int = 10
    """Argon2 verifications one key id may cause per minute, from any address (a flood of
    wrong secrets with a real key id), counted before the hash check; over it: 429 at once.
    The key's holder is not held back once their key has passed in this process."""
    api_refusal_delay_seconds: float = 1.0
    """How long a request the rate limits refuse waits before its 429 is sent. The refusal
    is decided at once, from memory, and waiting costs the server only a timer, but it
    holds each flooding connection to one request per delay: without it, a flood of
    refusals from a few clients keeps the API's event loop and the machine's cores busy
    (measured in docs/benchmarks.md). 0 sends the 429 at once."""
    api_key_cache_seconds: float = 30.0
    """How long a verified key skips argon2 (revocation is still checked on every request)."""
    api_cache_dir: Path | None = None
    """Directory of the API's response cache (diskcache); unset uses ``<data_dir>/api-cache``."""
    api_cache_seconds: float = 300.0
    """Longest a cached response is kept (entries are also invalidated by every change)."""
    lists_refresh_seconds: float = 5.0
    """Seconds between the scorer's re-reads of the allow and deny lists."""
    api_tls_cert: Path | None = None
    """PEM certificate of the API and console; with ``api_tls_key`` they are served over
    HTTPS only. Unset: plain HTTP (keep ``api_host`` on loopback then)."""
    api_tls_key: Path | None = None
    """PEM private key of ``api_tls_cert`` (a secret: a file only the node's user reads)."""
    api_forwarded_allow_ips: tuple[str, ...] = ()
    """Reverse proxies whose ``X-Forwarded-For`` and ``X-Forwarded-Proto`` headers are
    believed: addresses or networks (``10.0.0.0/8``), or ``*`` for any. Empty (the
    default): believe none, so a client cannot pick its own address with the header. The
    API's rate limits and the console's sign-in throttle count by the client address; behind
    a proxy (on this host too: list ``127.0.0.1``) list it here, or every client behind it
    shares the proxy's address."""
    api_max_body_bytes: int = 1_048_576
    """Largest request body the API and the console accept; a larger one is refused with
    413 before it is read (by its Content-Length, or counted as a chunked body arrives). Also
    the largest console websocket message."""
    # --- replication and retention (issue 7: operating a fleet)
    replicate: bool = True
    """Start litestream as a child of ``branchguard run``, replicating the database to
    ``replica_url``. Set false where litestream runs as its own service (systemd, compose)."""
    replica_url: str | None = None
    """Litestream replica URL (``file:///path``, ``s3://bucket/path``, ``sftp://...``,
    ``nats://...``); unset is ``<data_dir>/replica``, which guards against a corrupt database
    but not a lost disk: point it at another machine in production."""
    replica_sync_interval_seconds: float = 1.0
    """Seconds between litestream's WAL checks and replica uploads: the most a committed
    transaction waits to reach the replica (see docs/operations.md for the lag measured)."""
    hot_days: int = 90
    """Days a transaction stays in the node database (the scorer's and the API's hot tier)."""
    warm_days: int = 365
    """Days a transaction is kept in a monthly archive database under ``archive_dir/warm``."""
    cold_days: int = 2557
    """Days a transaction is kept at all (7 years): older cold files are purged unless an
    account in them is on legal hold."""
    archive_dir: Path | None = None
    """Where the warm and cold tiers live; unset is ``<data_dir>/archive``."""
    nats_host: str = "127.0.0.1"
    """Address the node's nats-server listens on. Anything but loopback (terminals on the
    branch network) requires ``nats_auth_file``; use TLS there too."""
    nats_auth_file: Path | None = None
    """TOML file of NATS users: the node's own, and one per terminal group, each allowed to
    publish only to its terminals' ``tx.<branch>.<terminal>.>`` (a secret: keep it out of
    the repository; format in docs/deploy.md). Unset: no authentication (loopback only)."""
    nats_tls_cert: Path | None = None
    """PEM certificate of the nats-server; with ``nats_tls_key`` every client must use TLS."""
    nats_tls_key: Path | None = None
    """PEM private key of ``nats_tls_cert`` (a secret)."""
    nats_tls_ca: Path | None = None
    """PEM CA bundle the node verifies its nats-server against (unset: the system's)."""
    # issue 20: branches as leaf nodes of a regional hub (docs/hub.md)
    jetstream_domain: str | None = None
    """This branch's JetStream domain when its nats-server is a leaf node of a regional hub,
    e.g. ``br2``: unique per branch, and never ``hub``. Unset: no domain, a node on its own."""
    hub_url: str | None = dataclasses.field(default=None, repr=False)
    """The hub's leafnode URL(s), comma-separated, with this branch's credentials, as
    ``branchguard hub config`` writes them (``nats-leaf://br2:<password>@hub.example:7422``):
    the node's nats-server connects to the hub as a leaf node, and keeps working on its own
    while the link is down. Needs ``jetstream_domain``. A secret: it holds a password."""
    case_flows: bool = True
    """Whether a partitioned scorer (``branchguard cluster scorer``) sends its machine's cases
    up to the site's analyst host and applies the casework that comes back
    (operations/case_flows.py). Turn it off only on a site where nobody works cases across
    machines (``branchguard bench cluster`` does, to measure the scorers alone)."""
    hub_branches: tuple[str, ...] = ()
    """At the hub (``branchguard hub run``): the branches it serves, as ``branchguard hub
    config`` named them (each branch's name is its ``branch`` and its JetStream domain)."""
    hub_monitor_url: str | None = None
    """At the hub: its nats-server's monitoring address (``http://127.0.0.1:8222``), where
    ``branchguard hub run`` reads which branches' leaf links are up (``/leafz``)."""

    # --- analyst console (issue 5)
    console_enabled: bool = True
    """Whether ``branchguard serve`` also serves the analyst console under ``/console``."""
    console_secret: str | None = dataclasses.field(default=None, repr=False)
    """Key that signs the console's session cookie; unset generates one into
    ``<data_dir>/console-secret`` (mode 0600) at first start and reuses it after."""
    console_idle_minutes: float = 30.0
    """Minutes without a page load or action after which a console session ends."""
    console_poll_seconds: float = 0.5
    """How often an open queue page checks for new or changed alerts (one cheap query)."""
    # --- analyst console: sign-in throttling and the terminals map (issue 5, part 2)
    console_login_max_failures: int = 5
    """Failed console sign-ins, per username and per client address, within
    ``console_login_window_minutes`` that lock further attempts on it."""
    console_login_window_minutes: float = 15.0
    """The window over which failed sign-ins are counted."""
    console_login_lockout_minutes: float = 15.0
    """How long a locked username or address is refused, even with the right password."""
    console_map_tiles: str = ""
    """Tile URL template of the case page's terminals map (e.g.
    ``https://tile.openstreetmap.org/{z}/{x}/{y}.png``, or a tile server inside the bank);
    empty: no tile layer (the markers still show, on a blank background)."""
    # --- issue 3: model lifecycle
    model_check_seconds: float = 2.0
    """Seconds between the scorer's checks of the registry's production pointer (hot swap)."""
    label_refresh_seconds: float = 5.0
    """Seconds between the scorer's reads of newly imported labels (label features)."""
    alert_budget_per_day: float = 100.0
    """Alerts per day the fraud team can work: the scorer keeps model-driven alerts near it
    (``alert_budget_*`` below, docs/scoring.md), recall at this budget is reported, and a
    candidate raising more alerts per day than this is not promoted."""
    promotion_min_f1_gain: float = 0.02
    """Relative F1 gain (at the operating threshold) a candidate needs over production to be
    promoted (0.02 = 2 % higher)."""
    retrain_window_days: float = 90.0
    """Days of stored transactions ``branchguard retrain`` trains on."""
    drift_psi_threshold: float = 0.2
    """Population stability index above which ``branchguard drift run`` logs a WARNING."""
    # --- issue 17: what the node accepts beyond the contract's shape (docs/transactions.md)
    event_time_check: bool = True
    """Dead-letter a transaction whose event time is more than ``max_event_lag_days`` behind,
    or more than ``max_clock_skew_seconds`` ahead of, the time the TX stream stored it. Turn
    it off only while loading history (``simulate --csv``, the Handbook protocol, a new node
    loading its past): the scorer logs a WARNING at start while it is off."""
    max_event_lag_days: float = 7.0
    """How late an event may arrive: store-and-forward from a terminal that was offline."""
    max_clock_skew_seconds: float = 300.0
    """How far ahead of the node's clock an event time may be (a terminal's fast clock)."""
    currency: str = "EUR"
    """The node's currency (ISO 4217): amounts are judged, summed and stored in it, and the
    rules' thresholds (``high_value_amount``) are amounts of it."""
    currency_rates: dict[str, float] = dataclasses.field(default_factory=dict)
    """Rates into ``currency`` of the other currencies the node accepts: ``{USD = 0.92}``
    in TOML, ``USD=0.92,GBP=1.17`` in the environment, means 1 USD is 0.92 of ``currency``.
    A transaction in a currency with no rate is dead-lettered as ``currency not accepted``;
    a converted one keeps the amount and currency it was sent in beside it."""
    # --- issue 18 (B): the alert budget in the scorer (scoring/budget.py, docs/scoring.md)
    alert_budget: bool = True
    """Model-driven alerts follow ``alert_budget_per_day`` (hard rule hits always alert).
    False: the fixed thresholds (``warning_risk``, ``high_risk``, ``critical_risk``) decide
    every alert, as before issue 18."""
    alert_budget_window_days: float = 7.0
    """Days of event time (whole hours) over which the distribution of risk is kept."""
    alert_budget_high_share: float = 0.2
    """Share of the model's alerts that are HIGH: those in the top 20 % of its budget..."""
    alert_budget_critical_share: float = 0.01
    """...and CRITICAL (decision: decline) in the top 1 %, if their risk is also at least
    ``critical_risk``. 0 turns model-only declines off."""
    alert_budget_min_samples: int = 1000
    """Until this many eligible transactions are in the window, and a day of event time has
    been seen (a cold start), the model alone raises only WARNING, and only at
    ``alert_budget_cold_risk``."""
    alert_budget_cold_risk: float = 0.95
    """The model's alert threshold during a cold start."""
    alert_budget_min_risk: float = 0.5
    """No model alert below this risk, whatever the budget (0.5 is what 1 % of the training
    traffic exceeds): with little traffic the budget would otherwise alert on ordinary
    transactions."""
    alert_budget_min_history: int = 3
    """Earlier transactions an account needs before the model alone may alert on it (hard
    rules alert from the first): with no past its features look unusual to the model."""
    alert_budget_burst: float = 3.0
    """Most model alerts in one hour of event time, as a multiple of the budget's hourly
    share: a backlog, a new model or drift cannot flood the queue."""
    # issue 18 (A): typology rules (docs/rules.md)
    rules_file: Path | None = None
    """The typology rules file the scorer reads (TOML, docs/rules.md); unset is
    ``<data_dir>/rules.toml`` once ``branchguard rules deploy`` has installed one there,
    else the shipped ``appliance/scoring/rules.toml``. Re-read when it changes (checked every
    ``model_check_seconds``)."""
    terminals_refresh_seconds: float = 30.0
    """Seconds between the scorer's reads of the terminal directory's places (for
    ``impossible_travel``)."""
    # issue 19 (B): partitions of the TX stream by account (docs/operations.md)
    partitions: int = 1
    """Partitions of the TX stream by account, fixed when the stream is created. Above 1,
    the server stores what terminals publish on ``tx.<b>.<t>.<a>`` as ``txp.<p>.<b>.<t>.<a>``
    with ``p`` = FNV-1a-32(account) mod ``partitions``, so scorers can split the accounts.
    1 (the default): no partitions, the stream as it always was. A node refuses to start on
    a TX stream created with another count."""
    # issue 19 (C): partition ownership by lease (appliance/lease.py, docs/operations.md)
    lease_ttl_seconds: float = 2.0
    """Seconds a partition's lease in the ``BG_LEASES`` bucket lives unless renewed: about
    the longest a dead scorer keeps its partitions (a takeover after a SIGKILL measured
    1.9-2.35 s at 2.0; docs/operations.md). Every scorer sharing the bucket must use the same
    value: the bucket is made with it."""
    partition_replica_url: str | None = None
    """Where each partition's database is replicated (Litestream, while ``replicate``), with
    ``{partition}`` replaced by its number, so a partition's next owner on another machine
    restores it (operations/partition_state.py): e.g. ``s3://bucket/branchguard/p{partition}``,
    ``file:///srv/shared/p{partition}``, or ``nats://host:4222/bg-p{partition}`` (one bucket
    per database: Litestream's NATS replica ignores a path). Unset:
    ``<data_dir>/replica/partitions/p<p>``, which moves nothing between machines."""
    lease_renew_seconds: float = 0.5
    """Seconds between renewals of a held lease, each a compare-and-set on its last revision;
    less than half of ``lease_ttl_seconds``, so one late or lost renewal does not lose it."""
    # issue 19 (A): a JetStream cluster (docs/operations.md, "A JetStream cluster")
    stream_replicas: int = 1
    """Replicas of each stream (``TX``, ``VERDICTS``, ``TX_DLQ``): 1 on a single server; 3
    on a 3-server cluster (``branchguard cluster config``), so a stream outlives one server.
    Set when the streams are created: a later change is applied by the server if it can."""

    @property
    def db_path(self) -> Path:
        return self.data_dir / "branchguard.db"

    @property
    def replica(self) -> str:
        """The replica URL litestream writes to and restores from."""
        if self.replica_url:
            return self.replica_url
        return (self.data_dir / "replica").resolve().as_uri()

    @property
    def archive_path(self) -> Path:
        return self.archive_dir if self.archive_dir is not None else self.data_dir / "archive"

    @property
    def nats_dir(self) -> Path:
        return self.data_dir / "nats"

    @property
    def cache_dir(self) -> Path:
        return self.api_cache_dir or self.data_dir / "api-cache"

    @property
    def nats_address(self) -> str:
        """The NATS URL the node uses: ``nats_url`` or the embedded server's."""
        return self.nats_url or f"nats://127.0.0.1:{self.nats_port}"

    def validate(self) -> Settings:
        """Raise :class:`SettingsError` for any value that cannot work; return self."""
        checks: list[tuple[bool, str, object, str]] = [
            (self.batch_size >= 1, "batch_size", self.batch_size, "use 1 or more"),
            (self.max_deliver >= 2, "max_deliver", self.max_deliver, "use 2 or more"),
            (self.ack_wait_seconds > 0, "ack_wait_seconds", self.ack_wait_seconds, "use > 0"),
            (self.child_restart_initial_seconds >= 0, "child_restart_initial_seconds",
             self.child_restart_initial_seconds, "use >= 0"),
            (self.child_restart_max_seconds >= self.child_restart_initial_seconds,
             "child_restart_max_seconds", self.child_restart_max_seconds,
             f"use >= child_restart_initial_seconds ({self.child_restart_initial_seconds})"),
            (0 <= self.nats_port < 65536, "nats_port", self.nats_port, "use 0..65535"),
            (self.sync_policy in SYNC_POLICIES, "sync_policy", self.sync_policy,
             f"use one of {', '.join(SYNC_POLICIES)}"),
            (0 < self.warning_risk <= 1, "warning_risk", self.warning_risk, "use (0, 1]"),
            (self.warning_risk <= self.high_risk <= 1, "high_risk", self.high_risk,
             f"use warning_risk ({self.warning_risk}) <= high_risk <= 1"),
            (self.high_risk <= self.critical_risk <= 1, "critical_risk", self.critical_risk,
             f"use high_risk ({self.high_risk}) <= critical_risk <= 1"),
            (0 < self.ml_risk_threshold <= 1, "ml_risk_threshold", self.ml_risk_threshold,
             "use a risk in (0, 1]"),
            (self.high_value_amount > 0, "high_value_amount", self.high_value_amount, "use > 0"),
            (self.model_check_seconds > 0, "model_check_seconds", self.model_check_seconds,
             "use > 0"),
            (self.label_refresh_seconds > 0, "label_refresh_seconds",
             self.label_refresh_seconds, "use > 0"),
            (self.alert_budget_per_day > 0, "alert_budget_per_day", self.alert_budget_per_day,
             "use > 0"),
            (self.promotion_min_f1_gain >= 0, "promotion_min_f1_gain",
             self.promotion_min_f1_gain, "use >= 0"),
            (self.drift_psi_threshold > 0, "drift_psi_threshold", self.drift_psi_threshold,
             "use > 0"),
            (self.retrain_window_days > 0, "retrain_window_days", self.retrain_window_days,
             "use > 0"),
            (self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
             self.log_level, "use DEBUG, INFO, WARNING or ERROR"),
            (self.loop_lag_window_seconds >= 0, "loop_lag_window_seconds",
             self.loop_lag_window_seconds, "use >= 0 (0 turns the loop-lag monitor off)"),
            # issue 6: alerts
            (self.alerts_group_wait_seconds >= 0, "alerts_group_wait_seconds",
             self.alerts_group_wait_seconds, "use >= 0"),
            (self.alerts_group_interval_seconds >= 0, "alerts_group_interval_seconds",
             self.alerts_group_interval_seconds, "use >= 0"),
            (self.alerts_rate_per_minute > 0, "alerts_rate_per_minute",
             self.alerts_rate_per_minute, "use > 0"),
            (self.alerts_digest_interval_seconds > 0, "alerts_digest_interval_seconds",
             self.alerts_digest_interval_seconds, "use > 0"),
            (self.alerts_retry_initial_seconds > 0, "alerts_retry_initial_seconds",
             self.alerts_retry_initial_seconds, "use > 0"),
            (self.alerts_retry_max_seconds >= self.alerts_retry_initial_seconds,
             "alerts_retry_max_seconds", self.alerts_retry_max_seconds,
             f"use >= alerts_retry_initial_seconds ({self.alerts_retry_initial_seconds})"),
            (self.alerts_max_age_seconds > 0, "alerts_max_age_seconds",
             self.alerts_max_age_seconds, "use > 0"),
            (self.alerts_poll_seconds > 0, "alerts_poll_seconds", self.alerts_poll_seconds,
             "use > 0"),
            (self.console_url.startswith(("http://", "https://")), "console_url",
             self.console_url, "use an http:// or https:// URL"),
            # analyst API (issue 4)
            (0 <= self.api_port < 65536, "api_port", self.api_port, "use 0..65535"),
            (self.api_rate_per_second > 0, "api_rate_per_second", self.api_rate_per_second,
             "use > 0"),
            (self.api_rate_burst >= 1, "api_rate_burst", self.api_rate_burst, "use 1 or more"),
            (self.api_verifications_per_minute >= 1, "api_verifications_per_minute",
             self.api_verifications_per_minute, "use 1 or more"),
            (0 <= self.api_refusal_delay_seconds <= 60, "api_refusal_delay_seconds",
             self.api_refusal_delay_seconds, "use 0 to 60 seconds"),
            (self.api_key_attempts_per_minute >= 1, "api_key_attempts_per_minute",
             self.api_key_attempts_per_minute, "use 1 or more"),
            (self.api_max_body_bytes >= 1024, "api_max_body_bytes", self.api_max_body_bytes,
             "use 1024 or more (bytes)"),
            (self.api_key_cache_seconds >= 0, "api_key_cache_seconds",
             self.api_key_cache_seconds, "use 0 or more"),
            (self.api_cache_seconds > 0, "api_cache_seconds", self.api_cache_seconds,
             "use > 0"),
            (self.lists_refresh_seconds > 0, "lists_refresh_seconds",
             self.lists_refresh_seconds, "use > 0"),
            ((self.api_tls_cert is None) == (self.api_tls_key is None), "api_tls_key",
             self.api_tls_key, "set both api_tls_cert and api_tls_key, or neither"),
            (all(_is_address(a) for a in self.api_forwarded_allow_ips),
             "api_forwarded_allow_ips", ",".join(self.api_forwarded_allow_ips),
             "use addresses or networks (10.0.0.0/8), comma-separated, or *"),
            # issue 20
            (self.jetstream_domain is None or (
                bool(re.fullmatch(r"[A-Za-z0-9_-]{1,32}", self.jetstream_domain))
                and self.jetstream_domain != "hub"), "jetstream_domain",
             self.jetstream_domain, "letters, digits, '-' and '_', unique per branch, not 'hub'"),
            (self.hub_url is None or self.jetstream_domain is not None, "hub_url",
             "(set)", "a leaf node of the hub needs its own jetstream_domain"),
            # issue 7
            (self.replica_sync_interval_seconds > 0, "replica_sync_interval_seconds",
             self.replica_sync_interval_seconds, "use > 0"),
            (self.hot_days >= 1, "hot_days", self.hot_days, "use 1 or more"),
            (self.hot_days <= self.warm_days, "warm_days", self.warm_days,
             f"use hot_days ({self.hot_days}) <= warm_days"),
            (self.warm_days <= self.cold_days, "cold_days", self.cold_days,
             f"use warm_days ({self.warm_days}) <= cold_days"),
            (self.nats_host in ("127.0.0.1", "::1", "localhost")
             or self.nats_auth_file is not None, "nats_host", self.nats_host,
             "listening beyond loopback needs nats_auth_file (and TLS)"),
            ((self.nats_tls_cert is None) == (self.nats_tls_key is None), "nats_tls_key",
             self.nats_tls_key, "set both nats_tls_cert and nats_tls_key, or neither"),
            # analyst console (issue 5)
            (self.console_idle_minutes > 0, "console_idle_minutes", self.console_idle_minutes,
             "use > 0"),
            (0 < self.console_poll_seconds <= 10, "console_poll_seconds",
             self.console_poll_seconds, "use (0, 10]"),
            (self.console_secret is None or len(self.console_secret) >= 32, "console_secret",
             "(hidden)", "use at least 32 characters, or unset it to generate one"),
            # analyst console, part 2 (issue 5)
            (self.console_login_max_failures >= 1, "console_login_max_failures",
             self.console_login_max_failures, "use 1 or more"),
            (self.console_login_window_minutes > 0, "console_login_window_minutes",
             self.console_login_window_minutes, "use a positive number of minutes"),
            (self.console_login_lockout_minutes > 0, "console_login_lockout_minutes",
             self.console_login_lockout_minutes, "use a positive number of minutes"),
            (self.console_map_tiles == "" or (
                self.console_map_tiles.startswith(("http://", "https://"))
                and all(p in self.console_map_tiles for p in ("{z}", "{x}", "{y}"))),
             "console_map_tiles", self.console_map_tiles,
             "use an http(s) URL with {z}, {x} and {y}, or leave it empty for no tiles"),
            # issue 17: what the node accepts
            (self.max_event_lag_days > 0, "max_event_lag_days", self.max_event_lag_days,
             "use a positive number of days"),
            (self.max_clock_skew_seconds >= 0, "max_clock_skew_seconds",
             self.max_clock_skew_seconds, "use 0 or more seconds"),
            (self.currency in iso_4217(), "currency", self.currency,
             "use an ISO 4217 code such as EUR"),
            (all(code in iso_4217() and code != self.currency for code in self.currency_rates),
             "currency_rates", format_value(self.currency_rates),
             f"use ISO 4217 codes other than the node's currency ({self.currency})"),
            (all(math.isfinite(rate) and rate > 0 for rate in self.currency_rates.values()),
             "currency_rates", format_value(self.currency_rates),
             "use positive rates: 1 unit of the code is that much of the node's currency"),
            # issue 18 (B): the alert budget
            (self.alert_budget_window_days * 24 >= 1, "alert_budget_window_days",
             self.alert_budget_window_days, "use at least 1/24 (an hour)"),
            (0 <= self.alert_budget_high_share <= 1, "alert_budget_high_share",
             self.alert_budget_high_share, "use a share in [0, 1]"),
            (0 <= self.alert_budget_critical_share <= self.alert_budget_high_share,
             "alert_budget_critical_share", self.alert_budget_critical_share,
             f"use 0 <= alert_budget_critical_share <= alert_budget_high_share "
             f"({self.alert_budget_high_share})"),
            (self.alert_budget_min_samples >= 0, "alert_budget_min_samples",
             self.alert_budget_min_samples, "use 0 or more"),
            (0 < self.alert_budget_cold_risk <= 1, "alert_budget_cold_risk",
             self.alert_budget_cold_risk, "use a risk in (0, 1]"),
            (0 <= self.alert_budget_min_risk <= 1, "alert_budget_min_risk",
             self.alert_budget_min_risk, "use a risk in [0, 1]"),
            (self.alert_budget_min_history >= 0, "alert_budget_min_history",
             self.alert_budget_min_history, "use 0 or more"),
            (self.alert_budget_burst >= 1, "alert_budget_burst", self.alert_budget_burst,
             "use 1 or more (a multiple of the budget's hourly share)"),
            # issue 18 (A): typology rules
            (self.terminals_refresh_seconds > 0, "terminals_refresh_seconds",
             self.terminals_refresh_seconds, "use > 0"),
            # issue 19 (B): partitions
            (1 <= self.partitions <= MAX_PARTITIONS, "partitions", self.partitions,
             f"use 1 (no partitions) to {MAX_PARTITIONS}"),
            (self.partitions == 1 or self.tx_subjects == "tx.>", "tx_subjects",
             self.tx_subjects, "a partitioned TX stream takes every tx.> subject: use "
             "tx.> with partitions above 1"),
            # issue 19 (C): partition ownership by lease
            (self.lease_ttl_seconds >= 1, "lease_ttl_seconds", self.lease_ttl_seconds,
             "use 1 second or more (JetStream expires messages to the second)"),
            (0 < self.lease_renew_seconds < self.lease_ttl_seconds / 2, "lease_renew_seconds",
             self.lease_renew_seconds,
             f"use > 0 and < half of lease_ttl_seconds ({self.lease_ttl_seconds})"),
            # issue 19 (A): a JetStream cluster
            (1 <= self.stream_replicas <= 5, "stream_replicas", self.stream_replicas,
             "use 1 (one server) to 5; 3 on a 3-server cluster"),
            (self.nats_url is None or bool(nats_servers(self.nats_url)), "nats_url",
             self.nats_url, "use nats://host:port, or several comma-separated"),
        ]
        for ok, name, value, hint in checks:
            if not ok:
                raise SettingsError("invalid value", field=name, value=value, hint=hint)
        return self


def nats_servers(url: str) -> list[str]:
    """The server URLs in a ``nats_url`` (comma-separated, spaces ignored): what a NATS
    client is given, so it can connect to any of them and fail over to the others."""
    return [part.strip() for part in url.split(",") if part.strip()]


def _is_address(text: str) -> bool:
    """Whether ``text`` is an IP address, a network or ``*``: what uvicorn's proxy check
    understands (anything else it would silently treat as a literal that never matches)."""
    if text == "*":
        return True
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _convert(name: str, kind: Any, raw: object) -> object:
    """Coerce a TOML or environment value to the field's declared type."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    try:
        if kind is Path or (args and Path in args):
            if raw in (None, "") and type(None) in args:
                return None
            if raw == "":
                raise ValueError("an empty path")
            return Path(str(raw))
        if origin is dict:  # CODE=RATE pairs: a TOML table, or comma-separated text
            if isinstance(raw, str):
                pairs = [p.split("=", 1) for p in raw.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError("use CODE=RATE pairs, comma-separated")
                table: dict[object, object] = {k.strip(): v.strip() for k, v in pairs}
            elif isinstance(raw, dict):
                table = cast(dict[object, object], raw)
            else:
                raise ValueError("use a table of CODE = RATE")
            return {str(k): float(cast(float, v)) for k, v in table.items()}
        if origin is tuple:
            items = raw.split(",") if isinstance(raw, str) else list(cast(list[object], raw))
            return tuple(str(i).strip() for i in items if str(i).strip())
        if args and type(None) in args:  # str | None
            return None if raw in (None, "") else str(raw)
        if kind is bool:
            return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
        if kind is int and isinstance(raw, (float, bool)):
            raise ValueError(f"{raw!r} is not a whole number")
        if kind in (int, float, str):
            return kind(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"cannot read {raw!r} as {kind}", field=name, value=raw,
                            hint=str(exc)) from exc
    raise SettingsError(f"unsupported setting type {kind}", field=name)


def load(config_file: Path | None = None, env: Mapping[str, str] | None = None,
         **overrides: object) -> Settings:
    """Build validated settings: defaults, then TOML, then environment, then ``overrides``.

    ``overrides`` whose value is None are ignored, so CLI flags that were not given fall
    through to the layers below.
    """
    env = os.environ if env is None else env
    hints = typing.get_type_hints(Settings)
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}

    path = config_file or (Path(env[ENV_PREFIX + "CONFIG"]) if ENV_PREFIX + "CONFIG" in env
                           else None)
    if path is None and Path(DEFAULT_CONFIG_FILE).exists():
        path = Path(DEFAULT_CONFIG_FILE)
    if path is not None:
        try:
            table = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read config file: {exc}", field="config",
                                value=str(path)) from exc
        for key, raw in table.items():
            if key not in known:
                raise SettingsError("unknown setting in config file", field=key,
                                    hint=f"see docs/settings.md; file {path}")
            values[key] = _convert(key, hints[key], raw)

    for f in fields(Settings):
        raw_env = env.get(ENV_PREFIX + f.name.upper())
        if raw_env is not None:
            values[f.name] = _convert(f.name, hints[f.name], raw_env)

    for key, raw in overrides.items():
        if raw is None:
            continue
        if key not in known:
            raise SettingsError("unknown setting", field=key)
        values[key] = _convert(key, hints[key], raw)
    return dataclasses.replace(Settings(), **values).validate()


def describe() -> list[tuple[str, str, str]]:
    """(name, default, documentation) for every setting, in declaration order."""
    import ast
    import inspect

    source = inspect.getsource(Settings)
    tree = ast.parse(source)
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    defaults = Settings()

    def shown(value: object) -> str:
        return "models/ (shipped)" if value == SHIPPED_MODELS_DIR else format_value(value)

    return [(f.name, shown(getattr(defaults, f.name)), " ".join(docs.get(f.name, "").split()))
            for f in fields(Settings)]


def format_value(value: object) -> str:
    """A setting's value as it would be written in a BRANCHGUARD_* variable."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" for k, v in value.items())
    return "(unset)" if value is None else str(value)


