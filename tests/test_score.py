"""Rules and scoring: each rule at its threshold, noisy-OR risk, severity and decision."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from appliance.scoring.features import FEATURES, INDEX, FeatureState
from appliance.scoring.rules import RULES, RULES_VERSION, evaluate
from appliance.scoring.score import judge, severity_of
from appliance.settings import Settings, load
from appliance.transaction import Transaction
from appliance.verdict import DECISIONS, SEVERITIES, Verdict

S = Settings()
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def tx(amount: float = 20.0, *, i: int = 0, category: str | None = "Grocery",
       location: str | None = "Espoo", account: str = "A1", minutes: float = 0.0) -> Transaction:
    return Transaction(transaction_id=f"t{i}", account_id=account, amount=amount, currency="EUR",
                       timestamp=T0 + timedelta(minutes=minutes), terminal_id="T1",
                       channel="POS", merchant_category=category, location=location)


def features(amount: float = 20.0, **values: float) -> tuple[float, ...]:
    """A feature tuple in FEATURES order: a quiet account with no history unless told."""
    row = [0.0] * len(FEATURES)
    row[INDEX["amount"]] = amount
    row[INDEX["account_mean_amount"]] = amount
    row[INDEX["amount_to_mean_ratio"]] = 1.0
    row[INDEX["seconds_since_previous"]] = 604800.0
    for name, value in values.items():
        row[INDEX[name]] = value
    return tuple(row)


def reasons(t: Transaction, f: tuple[float, ...], model_risk: float = 0.0,
            s: Settings = S) -> list[str]:
    return [h.reason for h in evaluate(t, f, model_risk, s)]


def verdict(t: Transaction, f: tuple[float, ...], model_risk: float = 0.0,
            s: Settings = S) -> Verdict:
    return judge(t, f, model_risk, "m-test", RULES_VERSION, s)


def history(state: FeatureState, n: int, amount: float = 20.0,
            location: str = "Espoo") -> None:
    for i in range(n):
        state.observe(tx(amount, i=1000 + i, location=location, minutes=i))


# --- the quiet case ---------------------------------------------------------------------------


def test_quiet_transaction_fires_nothing_and_is_approved() -> None:
    v = verdict(tx(20.0), features(20.0), 0.05)
    assert v.reasons == [] and v.details == []
    assert v.risk == 0.05
    assert v.severity == "INFO" and v.decision == "approve"


def test_rules_are_the_four_reference_rules_in_order() -> None:
    assert [r.__name__ for r in RULES] == ["high_value", "suspicious_combo", "high_deviation",
                                           "ml_anomaly"]


# --- high_value -------------------------------------------------------------------------------


def test_high_value_fires_at_threshold() -> None:
    amount = S.high_value_amount
    assert reasons(tx(amount), features(amount)) == ["high_value"]


def test_high_value_does_not_fire_just_below() -> None:
    amount = S.high_value_amount - 0.01
    assert reasons(tx(amount), features(amount)) == []


def test_high_value_detail_names_amount_and_threshold() -> None:
    (hit,) = evaluate(tx(6000.0), features(6000.0), 0.0, S)
    assert hit.detail == "amount 6000.00 >= 5000.00"
    assert hit.risk == 0.5


# --- high_deviation ---------------------------------------------------------------------------


def deviation_features(amount: float, prior: int, mean: float = 20.0) -> tuple[float, ...]:
    return features(amount, account_mean_amount=mean, account_prior_count=float(prior),
                    amount_to_mean_ratio=amount / mean)


def test_high_deviation_fires_at_multiple_with_enough_history() -> None:
    prior = S.deviation_min_history + 1
    amount = S.deviation_multiple * 20.0
    assert reasons(tx(amount), deviation_features(amount, prior)) == ["high_deviation"]


def test_high_deviation_needs_more_than_min_history() -> None:
    amount = S.deviation_multiple * 20.0
    assert reasons(tx(amount), deviation_features(amount, S.deviation_min_history)) == []


def test_high_deviation_does_not_fire_just_below_multiple() -> None:
    amount = S.deviation_multiple * 20.0 - 0.01
    assert reasons(tx(amount), deviation_features(amount, S.deviation_min_history + 1)) == []


def test_high_deviation_detail() -> None:
    (hit,) = evaluate(tx(150.0), deviation_features(150.0, 8, mean=25.0), 0.0, S)
    assert hit.reason == "high_deviation"
    assert hit.detail == "amount 150.00 is 6.0x the account mean 25.00 (>= 5x, 8 prior)"
    assert hit.risk == 0.6


def test_high_deviation_from_live_feature_state() -> None:
    """Through FeatureState: prior count is the number of earlier transactions."""
    exactly_min = FeatureState()
    history(exactly_min, S.deviation_min_history)
    f = exactly_min.observe(tx(100.0, i=1, minutes=60))
    assert f[INDEX["account_prior_count"]] == S.deviation_min_history
    assert "high_deviation" not in reasons(tx(100.0, i=1), f)

    one_more = FeatureState()
    history(one_more, S.deviation_min_history + 1)
    f = one_more.observe(tx(100.0, i=1, minutes=60))
    assert f[INDEX["account_mean_amount"]] == 20.0
    assert "high_deviation" in reasons(tx(100.0, i=1), f)

    below = FeatureState()
    history(below, S.deviation_min_history + 1)
    f = below.observe(tx(99.99, i=1, minutes=60))
    assert "high_deviation" not in reasons(tx(99.99, i=1), f)


def test_judge_survives_a_history_of_sub_milli_amounts() -> None:
    """Amounts are only required to be > 0, but the account mean is kept in thousandths, so
    a history of valid tiny amounts has mean 0.0: high_deviation must not divide by it."""
    state = FeatureState()
    for i in range(S.deviation_min_history + 1):
        state.observe(tx(0.0004, i=2000 + i, minutes=i))
    t = tx(0.0004, i=1, minutes=60)
    f = state.observe(t)
    assert f[INDEX["account_mean_amount"]] == 0.0
    assert f[INDEX["account_prior_count"]] > S.deviation_min_history
    v = verdict(t, f, 0.1)  # raised ZeroDivisionError in the rule's detail
    assert isinstance(v, Verdict)


def test_high_deviation_with_zero_mean_does_not_raise() -> None:
    f = deviation_features(50.0, S.deviation_min_history + 1, mean=1.0)
    row = list(f)
    row[INDEX["account_mean_amount"]] = 0.0
    hits = evaluate(tx(50.0), tuple(row), 0.0, S)  # raised ZeroDivisionError
    assert all(isinstance(h.detail, str) for h in hits)


# --- suspicious_combo -------------------------------------------------------------------------


def test_suspicious_combo_risky_category_at_first_time_location() -> None:
    t = tx(50.0, category="Gambling", location="Tallinn")
    assert reasons(t, features(50.0, first_time_location=1.0)) == ["suspicious_combo"]


def test_suspicious_combo_not_at_a_usual_location() -> None:
    t = tx(50.0, category="Gambling", location="Espoo")
    assert reasons(t, features(50.0, first_time_location=0.0)) == []


@pytest.mark.parametrize("category", ["Grocery", "gambling", None])
def test_suspicious_combo_not_for_other_categories(category: str | None) -> None:
    t = tx(50.0, category=category, location="Tallinn")
    assert reasons(t, features(50.0, first_time_location=1.0)) == []


def test_suspicious_combo_from_live_feature_state() -> None:
    state = FeatureState()
    history(state, 3, location="Espoo")
    usual = tx(50.0, i=1, category="Gambling", location="Espoo", minutes=60)
    assert "suspicious_combo" not in reasons(usual, state.observe(usual))
    away = tx(50.0, i=2, category="Gambling", location="Tallinn", minutes=61)
    assert reasons(away, state.observe(away)) == ["suspicious_combo"]
    # Tallinn is now a known location
    again = tx(50.0, i=3, category="Gambling", location="Tallinn", minutes=62)
    assert reasons(again, state.observe(again)) == []


def test_suspicious_combo_detail() -> None:
    (hit,) = evaluate(tx(50.0, category="Gambling", location="Tallinn"),
                      features(50.0, first_time_location=1.0), 0.0, S)
    assert hit.detail == "Gambling at Tallinn, outside the account's usual locations"
    assert hit.risk == 0.6


# --- ml_anomaly -------------------------------------------------------------------------------


def test_ml_anomaly_fires_at_threshold() -> None:
    hits = evaluate(tx(), features(), S.ml_risk_threshold, S)
    assert [h.reason for h in hits] == ["ml_anomaly"]
    assert hits[0].risk == S.ml_risk_threshold
    assert hits[0].detail == "model risk 0.70 >= 0.70"


def test_ml_anomaly_does_not_fire_just_below() -> None:
    assert reasons(tx(), features(), S.ml_risk_threshold - 1e-9) == []


def test_model_risk_is_not_counted_twice() -> None:
    v = verdict(tx(), features(), 0.75)
    assert v.reasons == ["ml_anomaly"]
    assert v.risk == 0.75  # not 1 - 0.25 * 0.25
    assert v.model_risk == 0.75


# --- several rules, noisy-OR ------------------------------------------------------------------


def test_all_rules_fire_and_all_reasons_are_kept_in_order() -> None:
    t = tx(6000.0, category="Gambling", location="Tallinn")
    f = features(6000.0, account_mean_amount=100.0, account_prior_count=10.0,
                 first_time_location=1.0)
    v = verdict(t, f, 0.75)
    assert v.reasons == ["high_value", "suspicious_combo", "high_deviation", "ml_anomaly"]
    assert len(v.details) == 4
    assert v.details[0].startswith("amount 6000.00 >= ")
    # 1 - (1 - model) * (1 - 0.5) * (1 - 0.6) * (1 - 0.6)
    assert v.risk == round(1 - 0.25 * 0.5 * 0.4 * 0.4, 6) == 0.98
    assert v.severity == "CRITICAL" and v.decision == "decline"


def test_noisy_or_for_a_known_case() -> None:
    t = tx(5000.0, category="Gambling", location="Tallinn")
    v = verdict(t, features(5000.0, first_time_location=1.0), 0.2)
    assert v.reasons == ["high_value", "suspicious_combo"]
    assert v.risk == 0.84  # 1 - 0.8 * 0.5 * 0.4
    assert v.severity == "HIGH" and v.decision == "review"


def test_noisy_or_with_zero_model_risk_is_the_rule_risk() -> None:
    v = verdict(tx(5000.0), features(5000.0), 0.0)
    assert v.reasons == ["high_value"]
    assert v.risk == 0.5


def test_risk_and_model_risk_are_rounded_to_six_places() -> None:
    v = verdict(tx(), features(), 0.123456789)
    assert v.model_risk == 0.123457
    assert v.risk == 0.123457


def test_verdict_carries_identity_and_versions() -> None:
    v = judge(tx(i=42), features(), 0.1, "if-v9", "rules-v7", S)
    assert v.transaction_id == "t42"
    assert v.model_version == "if-v9"
    assert v.rules_version == "rules-v7"


# --- severity and decision --------------------------------------------------------------------


@pytest.mark.parametrize(("risk", "severity"), [
    (1.0, "CRITICAL"), (0.9, "CRITICAL"), (0.899999, "HIGH"), (0.8, "HIGH"),
    (0.799999, "WARNING"), (0.6, "WARNING"), (0.599999, "INFO"), (0.0, "INFO"),
])
def test_severity_boundaries(risk: float, severity: str) -> None:
    assert severity_of(risk, 10.0, S) == severity


@pytest.mark.parametrize(("model_risk", "severity", "decision"), [
    (0.9, "CRITICAL", "decline"), (0.899999, "HIGH", "review"), (0.8, "HIGH", "review"),
    (0.799999, "WARNING", "review"), (0.6, "WARNING", "review"), (0.599999, "INFO", "approve"),
])
def test_judge_severity_and_decision_at_boundaries(model_risk: float, severity: str,
                                                   decision: str) -> None:
    v = verdict(tx(), features(), model_risk)
    assert v.risk == model_risk
    assert (v.severity, v.decision) == (severity, decision)


def test_decisions_table() -> None:
    assert DECISIONS == {"CRITICAL": "decline", "HIGH": "review", "WARNING": "review",
                         "INFO": "approve"}
    assert set(SEVERITIES) == set(DECISIONS)


def test_high_amount_forces_at_least_high() -> None:
    assert severity_of(0.0, S.high_value_amount, S) == "HIGH"
    assert severity_of(0.65, S.high_value_amount, S) == "HIGH"
    assert severity_of(0.0, S.high_value_amount - 0.01, S) == "INFO"
    assert severity_of(0.95, S.high_value_amount, S) == "CRITICAL"  # at least, not at most


# --- non-default settings ---------------------------------------------------------------------


CUSTOM = load(None, env={}, high_value_amount=100.0, risky_categories="Crypto,Pawn",
              deviation_multiple=2.0, deviation_min_history=1, ml_risk_threshold=0.5,
              warning_risk=0.3, high_risk=0.4, critical_risk=0.7)


def test_custom_high_value_threshold() -> None:
    assert reasons(tx(100.0), features(100.0), s=CUSTOM) == ["high_value"]
    assert reasons(tx(99.99), features(99.99), s=CUSTOM) == []
    assert severity_of(0.0, 100.0, CUSTOM) == "HIGH"
    assert severity_of(0.0, 99.99, CUSTOM) == "INFO"


def test_custom_deviation_thresholds() -> None:
    assert reasons(tx(40.0), deviation_features(40.0, 2), s=CUSTOM) == ["high_deviation"]
    assert reasons(tx(40.0), deviation_features(40.0, 1), s=CUSTOM) == []
    assert reasons(tx(39.99), deviation_features(39.99, 2), s=CUSTOM) == []
    # with the defaults the same transaction is unremarkable
    assert reasons(tx(40.0), deviation_features(40.0, 2)) == []


def test_custom_risky_categories() -> None:
    f = features(50.0, first_time_location=1.0)
    assert reasons(tx(50.0, category="Crypto"), f, s=CUSTOM) == ["suspicious_combo"]
    assert reasons(tx(50.0, category="Pawn"), f, s=CUSTOM) == ["suspicious_combo"]
    assert reasons(tx(50.0, category="Gambling"), f, s=CUSTOM) == []


def test_custom_ml_threshold() -> None:
    assert reasons(tx(), features(), 0.5, CUSTOM) == ["ml_anomaly"]
    assert reasons(tx(), features(), 0.499999, CUSTOM) == []
    assert reasons(tx(), features(), 0.5) == []


@pytest.mark.parametrize(("model_risk", "severity"), [
    (0.7, "CRITICAL"), (0.699999, "HIGH"), (0.4, "HIGH"), (0.399999, "WARNING"),
    (0.3, "WARNING"), (0.299999, "INFO"),
])
def test_custom_severity_thresholds(model_risk: float, severity: str) -> None:
    assert verdict(tx(), features(), model_risk, CUSTOM).severity == severity
