"""The rules file: the shipped one reads, a bad one is refused naming its key, a deploy is
installed atomically and audited, and ``rules test`` gives the figures of a small labelled
store for the candidate beside the rules in force."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import audit
from appliance import cli
from appliance.scoring.features import FEATURES_VERSION, FeatureState
from appliance.scoring.rulebook import (SHIPPED_RULES, RulesError, deploy, load, parse,
                                        rules_history, rules_path)
from appliance.scoring.rules import RULES_VERSION
from appliance.scoring.rules_trial import report, trial
from appliance.scoring.score import judge
from appliance.settings import Settings
from appliance.store import Scored, Store
from appliance.transaction import Transaction

SHIPPED = SHIPPED_RULES.read_text()


def test_the_shipped_file_is_the_default_and_its_version_is_rules_version() -> None:
    book = load(SHIPPED_RULES)
    assert book.version == RULES_VERSION == "rules-v2"
    assert book.velocity_burst.count == 6 and book.velocity_burst.seconds == 60.0
    assert book.card_testing.small_amount == 5.0 and book.atm_cashout.terminals == 3
    assert rules_path(Settings(data_dir=Path("/nonexistent"))) == SHIPPED_RULES


@pytest.mark.parametrize(("change", "field", "words"), [
    (("version = \"rules-v2\"", ""), "version", "missing"),
    (("version = \"rules-v2\"", "version = \"rules v2!\""), "version", "not a version name"),
    (("[atm_cashout]", "[atm_cash_out]"), "atm_cash_out", "unknown key"),
    (("count = 6", "count = 6.5"), "velocity_burst.count", "not a whole number"),
    (("count = 6", "count = 1"), "velocity_burst.count", "out of range"),
    (("count = 6", "count = \"6\""), "velocity_burst.count", "not a number"),
    (("small_amount = 5.0", "small_amount = 0"), "card_testing.small_amount", "out of range"),
    (("small_amount = 5.0", "small_amount = 5.0\nsmall_amounts = 4"),
     "card_testing.small_amounts", "unknown key"),
    (("declines = 3\n", ""), "card_testing.declines", "missing key"),
    (("seconds = 3600", "seconds = 90000"), "atm_cashout.seconds", "out of range"),
    (("max_kmh = 900.0", "max_kmh = nan"), "impossible_travel.max_kmh", "not a finite"),
    (("min_amount = 300.0\nmin_history = 5\nrisk = 0.6", "min_amount = 300.0\nmin_history = 5"
                                                         "\nrisk = 1.0"),
     "new_terminal_large.risk", "out of range"),
    (("enabled = true\nmultiple = 3.0", "enabled = \"yes\"\nmultiple = 3.0"),
     "amount_spike.enabled", "not true or false"),
    (("version = ", "version = = "), "file", "not valid TOML"),
])
def test_a_bad_file_is_refused_naming_its_key(change: tuple[str, str], field: str,
                                              words: str) -> None:
    old, new = change
    assert old in SHIPPED
    text = SHIPPED.replace(old, new, 1)
    with pytest.raises(RulesError) as err:
        parse(text)
    assert err.value.field == field
    assert words in str(err.value)


def candidate(tmp_path: Path, version: str, **values: str) -> Path:
    text = SHIPPED.replace('version = "rules-v2"', f'version = "{version}"')
    for old, new in values.items():
        assert old in text
        text = text.replace(old, new, 1)
    path = tmp_path / f"{version}.toml"
    path.write_text(text)
    return path


def test_deploy_installs_the_file_audits_it_and_refuses_a_bad_one(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "node")
    good = candidate(tmp_path, "rules-v3", **{"count = 6": "count = 4"})
    done = deploy(settings, good, "cli:tester", "burst of four")
    assert done.path == tmp_path / "node" / "rules.toml"
    assert (done.previous, done.version) == ("rules-v2", "rules-v3")
    assert rules_path(settings) == done.path
    assert load(rules_path(settings)).velocity_burst.count == 4

    bad = candidate(tmp_path, "rules-v4", **{"count = 6": "count = 0"})
    with pytest.raises(RulesError, match="velocity_burst.count"):
        deploy(settings, bad, "cli:tester")
    assert load(rules_path(settings)).version == "rules-v3"  # unchanged

    conn = sqlite3.connect(settings.db_path)
    (entry,) = rules_history(conn)
    assert audit.verify(conn).broken_seq is None
    conn.close()
    assert entry["action"] == "rules.deploy" and entry["subject"] == "rules:rules-v3"
    assert entry["actor"] == "cli:tester"
    assert entry["before"]["version"] == "rules-v2"
    assert entry["after"]["version"] == "rules-v3"
    assert entry["after"]["reason"] == "burst of four"
    assert entry["after"]["sha256"] == load(good).sha256


T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def labelled_store(data: Path) -> None:
    """Two days: day one an account's burst of 5 in 50 s (frauds, labelled) among quiet
    accounts; day two a burst of 4 (not labelled: counted genuine) and quiet ones."""
    rows: list[tuple[Transaction, bool]] = []
    n = 0

    def add(account: str, at: datetime, fraud: bool = False) -> None:
        nonlocal n
        n += 1
        rows.append((Transaction(transaction_id=f"t{n:04d}", account_id=account, amount=25.0,
                                 currency="EUR", timestamp=at, terminal_id="T1",
                                 channel="POS"), fraud))

    for a in range(5):
        for k in range(6):
            add(f"Q{a}", T0 + timedelta(hours=4 * k, minutes=a))
    for k in range(5):
        add("F1", T0 + timedelta(hours=2, seconds=10 * k), fraud=True)
    for k in range(4):
        add("G1", T0 + timedelta(days=1, hours=2, seconds=10 * k))
    rows.sort(key=lambda r: r[0].timestamp)
    settings = Settings(data_dir=data)
    store = Store.open(settings.db_path)
    try:
        state = FeatureState()
        scored = [Scored(tx, "BR001", i + 1, f, FEATURES_VERSION,
                         judge(tx, f, 0.1, "m", RULES_VERSION, settings))
                  for i, (tx, _) in enumerate(rows) for f in [state.observe(tx)]]
        store.save_batch(scored, [], "scorer", len(scored))
        store.reader.conn.executemany(
            "INSERT INTO labels (transaction_id, label, known_at, source, imported_at) "
            "VALUES (?, 1, '2026-03-10T00:00:00Z', 'test', '2026-03-10T00:00:00Z')",
            [(tx.transaction_id,) for tx, fraud in rows if fraud])
        store.reader.conn.commit()
    finally:
        store.close()


def test_rules_test_figures_beside_the_rules_in_force(tmp_path: Path) -> None:
    data = tmp_path / "node"
    labelled_store(data)
    settings = Settings(data_dir=data)
    # in force (shipped): 6 in 60 s never happens; the candidate: 4 in 60 s
    path = candidate(tmp_path, "rules-v3", **{"count = 6": "count = 4"})
    result = trial(settings, path)
    assert result.transactions == 30 + 5 + 4 and result.days == ["2026-03-02", "2026-03-03"]
    assert result.labelled and result.frauds == 5
    c, f = result.candidate, result.in_force
    assert (c.version, f.version) == ("rules-v3", "rules-v2")
    assert f.alerts == 0 and f.precision is None and f.recall == 0.0
    # F1's 4th and 5th, G1's 4th
    assert c.alerts == 3 and dict(c.per_day) == {"2026-03-02": 2, "2026-03-03": 1}
    assert dict(c.by_typology) == {"velocity_burst": 3}
    assert c.frauds_alerted == 2
    assert c.precision == pytest.approx(2 / 3) and c.recall == pytest.approx(2 / 5)
    rows = [line.split() for line in report(result).splitlines()]
    assert ["precision", "66.7", "%", "–"] in rows
    assert ["recall", "40.0", "%", "0.0", "%"] in rows
    assert ["alerts", "per", "day", "1.5", "0.0"] in rows
    assert ["2026-03-02", "2", "0"] in rows and ["2026-03-03", "1", "0"] in rows

    out = CliRunner().invoke(cli.cli, ["rules", "test", str(path), "--data-dir", str(data),
                                       "--json"])
    assert out.exit_code == 0, out.output
    figures = json.loads(out.output)
    assert figures["candidate"]["alerts_per_day"] == {"2026-03-02": 2, "2026-03-03": 1}
    assert figures["in_force"]["version"] == "rules-v2"


def test_rules_test_counts_a_period_and_gives_recall_per_fraud_type(tmp_path: Path) -> None:
    """``--since``/``--until`` count only that period, with the state the replay built before
    it: day two's burst (G1) is labelled here, and only the period holding it counts it.
    Recall is given per fraud type, the labels' typology."""
    data = tmp_path / "node"
    labelled_store(data)
    settings = Settings(data_dir=data)
    conn = sqlite3.connect(settings.db_path)
    conn.execute("UPDATE labels SET typology = 'velocity_burst'")  # F1's five
    conn.executemany(
        "INSERT INTO labels (transaction_id, label, known_at, source, imported_at) "
        "VALUES (?, 1, '2026-03-10T00:00:00Z', 'test', '2026-03-10T00:00:00Z')",
        [(f"t{n:04d}",) for n in range(36, 40)])  # G1's four: no typology said
    conn.commit()
    conn.close()
    path = candidate(tmp_path, "rules-v3", **{"count = 6": "count = 4"})
    day2 = (T0 + timedelta(days=1) - timedelta(hours=9)).timestamp()  # 2026-03-03 00:00 UTC
    first = trial(settings, path, until=day2)
    assert first.transactions == 20 + 5 and first.days == ["2026-03-02"]
    assert dict(first.frauds_by_type) == {"velocity_burst": 5}
    assert first.candidate.alerts == 2 and first.candidate.frauds_alerted == 2
    assert dict(first.candidate.frauds_alerted_by_type) == {"velocity_burst": 2}
    second = trial(settings, path, since=day2)
    assert second.transactions == 10 + 4 and second.days == ["2026-03-03"]
    assert dict(second.frauds_by_type) == {"not said": 4}
    assert second.candidate.alerts == 1 and second.candidate.precision == 1.0
    assert second.candidate.recall == pytest.approx(1 / 4)
    assert ["not", "said", "1/4", "25", "%", "0/4", "0", "%"] in [
        line.split() for line in report(second).splitlines()]
    out = CliRunner().invoke(cli.cli, ["rules", "test", str(path), "--data-dir", str(data),
                                       "--until", "2026-03-03", "--json"])
    assert out.exit_code == 0, out.output
    figures = json.loads(out.output)
    assert figures["transactions"] == 25
    assert figures["candidate"]["recall_by_fraud_type"] == {"velocity_burst": 0.4}


def test_cli_refuses_a_bad_file_with_the_key_and_exit_2(tmp_path: Path) -> None:
    bad = candidate(tmp_path, "rules-v9", **{"terminals = 3": "terminals = 1"})
    out = CliRunner().invoke(cli.cli, ["rules", "deploy", str(bad), "--data-dir",
                                       str(tmp_path / "node")])
    assert out.exit_code == 2
    assert "atm_cashout.terminals: out of range (got 1)" in out.output
    assert not (tmp_path / "node" / "rules.toml").exists()
