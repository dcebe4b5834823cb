"""Settings: the layers (defaults -> TOML -> environment -> overrides), coercion, validation
and the self-documentation that docs/settings.md is generated from."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import SettingsError
from appliance.settings import DEFAULT_CONFIG_FILE, ENV_PREFIX, Settings, describe, load


@pytest.fixture(autouse=True)
def clean_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory (no stray branchguard.toml) with no BRANCHGUARD_* env."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    return work


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- layers -----------------------------------------------------------------------------------


def test_defaults_need_no_config() -> None:
    s = load(None, env={})
    assert s == Settings()
    assert s.validate() is s


def test_defaults_with_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load() == Settings()
    monkeypatch.setenv("BRANCHGUARD_BATCH_SIZE", "17")
    assert load().batch_size == 17  # env=None reads os.environ


def test_default_settings_validate() -> None:
    Settings().validate()


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.batch_size = 5  # type: ignore[misc]


def test_paths_derive_from_data_dir(tmp_path: Path) -> None:
    s = load(None, env={}, data_dir=tmp_path)
    assert s.db_path == tmp_path / "branchguard.db"
    assert s.nats_dir == tmp_path / "nats"


def test_toml_file_layer(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "node.toml", """
batch_size = 250
branch = "BR042"
nats_url = "nats://10.0.0.1:4222"
data_dir = "/srv/branchguard"
high_value_amount = 7500
risky_categories = ["Gambling", "Crypto"]
ack_wait_seconds = 12.5
""")
    s = load(config, env={})
    assert s.batch_size == 250
    assert s.branch == "BR042"
    assert s.nats_url == "nats://10.0.0.1:4222"
    assert s.data_dir == Path("/srv/branchguard")
    assert isinstance(s.data_dir, Path)
    assert s.high_value_amount == 7500.0 and isinstance(s.high_value_amount, float)
    assert s.risky_categories == ("Gambling", "Crypto")
    assert s.ack_wait_seconds == 12.5
    # untouched fields keep their defaults
    assert s.max_deliver == Settings().max_deliver


def test_toml_in_working_directory_is_read_by_default(clean_cwd: Path) -> None:
    write_toml(clean_cwd / DEFAULT_CONFIG_FILE, "batch_size = 33\n")
    assert load(None, env={}).batch_size == 33


def test_config_file_named_by_environment(tmp_path: Path, clean_cwd: Path) -> None:
    write_toml(clean_cwd / DEFAULT_CONFIG_FILE, "batch_size = 33\n")
    other = write_toml(tmp_path / "other.toml", "batch_size = 44\n")
    assert load(None, env={"BRANCHGUARD_CONFIG": str(other)}).batch_size == 44


def test_explicit_config_file_beats_environment_config(tmp_path: Path) -> None:
    a = write_toml(tmp_path / "a.toml", "batch_size = 1\n")
    b = write_toml(tmp_path / "b.toml", "batch_size = 2\n")
    assert load(a, env={"BRANCHGUARD_CONFIG": str(b)}).batch_size == 1


def test_env_layer_beats_toml(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "node.toml", 'batch_size = 250\nbranch = "BR042"\n')
    s = load(config, env={"BRANCHGUARD_BATCH_SIZE": "300"})
    assert s.batch_size == 300
    assert s.branch == "BR042"  # not in env: the TOML value stands


def test_overrides_beat_env(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "node.toml", "batch_size = 250\nmax_deliver = 3\n")
    s = load(config, env={"BRANCHGUARD_BATCH_SIZE": "300", "BRANCHGUARD_MAX_DELIVER": "4"},
             batch_size=400)
    assert s.batch_size == 400
    assert s.max_deliver == 4


def test_none_overrides_are_ignored(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "node.toml", 'branch = "BR042"\n')
    s = load(config, env={"BRANCHGUARD_BATCH_SIZE": "300"}, batch_size=None, branch=None,
             nats_url=None, data_dir=None)
    assert s.batch_size == 300
    assert s.branch == "BR042"
    assert s.nats_url is None
    assert s.data_dir == Settings().data_dir


def test_overrides_are_coerced(tmp_path: Path) -> None:
    s = load(None, env={}, data_dir=str(tmp_path), batch_size="12",
             risky_categories=["Gambling", "Crypto"])
    assert s.data_dir == tmp_path
    assert s.batch_size == 12
    assert s.risky_categories == ("Gambling", "Crypto")


def test_env_variables_for_other_prefixes_or_unknown_names_are_ignored() -> None:
    s = load(None, env={"BATCH_SIZE": "3", "BRANCHGUARD_NO_SUCH_SETTING": "x",
                        "branchguard_batch_size": "4"})
    assert s == Settings()


# --- coercion of environment strings ----------------------------------------------------------


def test_env_int() -> None:
    s = load(None, env={"BRANCHGUARD_BATCH_SIZE": "42", "BRANCHGUARD_NATS_PORT": "0"})
    assert s.batch_size == 42 and type(s.batch_size) is int
    assert s.nats_port == 0


def test_env_float() -> None:
    s = load(None, env={"BRANCHGUARD_ACK_WAIT_SECONDS": "2.5",
                        "BRANCHGUARD_HIGH_VALUE_AMOUNT": "7000"})
    assert s.ack_wait_seconds == 2.5 and type(s.ack_wait_seconds) is float
    assert s.high_value_amount == 7000.0 and type(s.high_value_amount) is float


def test_env_tuple_from_comma_list() -> None:
    s = load(None, env={"BRANCHGUARD_RISKY_CATEGORIES": "Gambling, Crypto ,,Pawn shop,"})
    assert s.risky_categories == ("Gambling", "Crypto", "Pawn shop")


def test_env_tuple_empty_string_is_empty_tuple() -> None:
    assert load(None, env={"BRANCHGUARD_RISKY_CATEGORIES": ""}).risky_categories == ()


def test_env_path() -> None:
    s = load(None, env={"BRANCHGUARD_DATA_DIR": "/var/lib/branchguard",
                        "BRANCHGUARD_MODELS_DIR": "models-here"})
    assert s.data_dir == Path("/var/lib/branchguard") and isinstance(s.data_dir, Path)
    assert s.models_dir == Path("models-here") and isinstance(s.models_dir, Path)


def test_env_optional_str() -> None:
    assert load(None, env={"BRANCHGUARD_NATS_URL": "nats://h:1"}).nats_url == "nats://h:1"
    assert load(None, env={"BRANCHGUARD_NATS_URL": ""}).nats_url is None


def test_env_str() -> None:
    s = load(None, env={"BRANCHGUARD_BRANCH": "BR777", "BRANCHGUARD_LOG_LEVEL": "DEBUG"})
    assert s.branch == "BR777"
    assert s.log_level == "DEBUG"


@pytest.mark.parametrize(("name", "raw"), [("batch_size", "ten"), ("batch_size", "5.5"),
                                           ("nats_port", ""), ("ack_wait_seconds", "soon"),
                                           ("deviation_min_history", "1e3")])
def test_env_value_that_cannot_be_read_names_the_field(name: str, raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(None, env={ENV_PREFIX + name.upper(): raw})
    assert info.value.field == name
    assert info.value.value == raw
    assert str(info.value).startswith(f"{name}: cannot read")
    assert "(hint: " in str(info.value)


def test_toml_float_for_an_int_setting_is_refused(tmp_path: Path) -> None:
    # 2.5 is not an int: silently truncating it to 2 would run with a value nobody configured
    config = write_toml(tmp_path / "node.toml", "batch_size = 2.5\n")
    with pytest.raises(SettingsError) as info:
        load(config, env={})
    assert info.value.field == "batch_size"


# --- validation -------------------------------------------------------------------------------


BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("batch_size", {"batch_size": 0}, "use 1 or more"),
    ("max_deliver", {"max_deliver": 1}, "use 2 or more"),
    ("ack_wait_seconds", {"ack_wait_seconds": 0}, "use > 0"),
    ("ack_wait_seconds", {"ack_wait_seconds": -1.5}, "use > 0"),
    ("nats_port", {"nats_port": -1}, "use 0..65535"),
    ("nats_port", {"nats_port": 65536}, "use 0..65535"),
    ("sync_policy", {"sync_policy": "never"}, "use one of always, interval"),
    ("warning_risk", {"warning_risk": 0.0}, "use (0, 1]"),
    ("high_risk", {"warning_risk": 0.85}, "use warning_risk (0.85) <= high_risk"),
    ("high_risk", {"high_risk": 0.5}, "use warning_risk (0.6) <= high_risk"),
    ("critical_risk", {"high_risk": 0.95}, "use high_risk (0.95) <= critical_risk"),
    ("critical_risk", {"critical_risk": 1.5}, "<= critical_risk <= 1"),
    ("data_dir", {"data_dir": ""}, "an empty path"),
    ("ml_risk_threshold", {"ml_risk_threshold": 0}, "use a risk in (0, 1]"),
    ("ml_risk_threshold", {"ml_risk_threshold": 1.01}, "use a risk in (0, 1]"),
    ("high_value_amount", {"high_value_amount": 0}, "use > 0"),
    ("log_level", {"log_level": "debug"}, "use DEBUG, INFO, WARNING or ERROR"),
    ("log_level", {"log_level": "TRACE"}, "use DEBUG, INFO, WARNING or ERROR"),
    ("api_forwarded_allow_ips", {"api_forwarded_allow_ips": ("10.0.0.1", "proxy.example")},
     "use addresses or networks"),
    ("api_key_attempts_per_minute", {"api_key_attempts_per_minute": 0}, "use 1 or more"),
    ("api_max_body_bytes", {"api_max_body_bytes": 1000}, "use 1024 or more"),
    ("api_refusal_delay_seconds", {"api_refusal_delay_seconds": -1}, "use 0 to 60 seconds"),
]


@pytest.mark.parametrize(("field", "overrides", "hint"), BAD_VALUES,
                         ids=[f"{f}-{next(iter(o.values()))}" for f, o, _ in BAD_VALUES])
def test_bad_value_raises_settings_error_naming_the_field(field: str, overrides: dict[str, Any],
                                                          hint: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(None, env={}, **overrides)
    error = info.value
    assert error.field == field
    assert error.hint is not None and hint in error.hint
    assert str(error).startswith(f"{field}: ")
    assert f"(hint: {error.hint})" in str(error)


def test_bad_value_from_env_is_also_validated() -> None:
    with pytest.raises(SettingsError) as info:
        load(None, env={"BRANCHGUARD_BATCH_SIZE": "0"})
    assert info.value.field == "batch_size"


def test_bad_value_from_toml_is_also_validated(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "node.toml", 'sync_policy = "sometimes"\n')
    with pytest.raises(SettingsError) as info:
        load(config, env={})
    assert info.value.field == "sync_policy"


def test_validate_on_a_hand_built_settings() -> None:
    with pytest.raises(SettingsError) as info:
        dataclasses.replace(Settings(), max_deliver=0).validate()
    assert info.value.field == "max_deliver"


@pytest.mark.parametrize("overrides", [
    {"nats_port": 0}, {"nats_port": 65535}, {"max_deliver": 2}, {"batch_size": 1},
    {"ml_risk_threshold": 1.0},
    {"warning_risk": 0.5, "high_risk": 0.5, "critical_risk": 0.5},
    {"warning_risk": 1.0, "high_risk": 1.0, "critical_risk": 1.0},
    {"sync_policy": "always"}, {"sync_policy": "interval"},
])
def test_boundary_values_are_accepted(overrides: dict[str, Any]) -> None:
    s = load(None, env={}, **overrides)
    for key, value in overrides.items():
        assert getattr(s, key) == value


def test_unknown_key_in_toml_raises(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "node.toml", "batch_size = 10\nbatchsize = 10\n")
    with pytest.raises(SettingsError) as info:
        load(config, env={})
    assert info.value.field == "batchsize"
    assert str(config) in str(info.value)


def test_toml_table_is_an_unknown_key(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "node.toml", "[rules]\nhigh_value_amount = 1\n")
    with pytest.raises(SettingsError) as info:
        load(config, env={})
    assert info.value.field == "rules"


def test_unknown_override_raises() -> None:
    with pytest.raises(SettingsError) as info:
        load(None, env={}, no_such_setting=1)
    assert info.value.field == "no_such_setting"


def test_broken_toml_raises_naming_config(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "node.toml", "batch_size = = 3\n")
    with pytest.raises(SettingsError) as info:
        load(config, env={})
    assert info.value.field == "config"
    assert info.value.value == str(config)


def test_missing_config_file_raises(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        load(tmp_path / "absent.toml", env={})
    assert info.value.field == "config"


def test_toml_value_of_wrong_type_names_the_field(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "node.toml", 'max_deliver = "many"\n')
    with pytest.raises(SettingsError) as info:
        load(config, env={})
    assert info.value.field == "max_deliver"


# --- describe ---------------------------------------------------------------------------------


def test_describe_lists_every_field_in_order() -> None:
    names = [name for name, _, _ in describe()]
    assert names == [f.name for f in dataclasses.fields(Settings)]


def test_every_setting_has_a_docstring() -> None:
    undocumented = [name for name, _, doc in describe() if not doc.strip()]
    assert undocumented == []


def test_describe_shows_defaults_as_an_operator_would_write_them() -> None:
    shown = {name: default for name, default, _ in describe()}
    assert shown["data_dir"] == "var"
    assert shown["nats_url"] == "(unset)"
    assert shown["risky_categories"] == "Gambling"
    assert shown["models_dir"] == "models/ (shipped)"  # not this machine's absolute path
    assert shown["batch_size"] == str(Settings().batch_size)
    # what is shown reads back as the default through the environment layer
    for name in ("batch_size", "high_value_amount", "sync_policy", "risky_categories"):
        assert load(None, env={f"BRANCHGUARD_{name.upper()}": shown[name]}) == Settings()


def test_describe_pairs_each_field_with_its_own_docstring() -> None:
    docs = {name: doc for name, _, doc in describe()}
    assert "SQLite" in docs["data_dir"]
    assert "high_value" in docs["high_value_amount"]
    assert "ml_anomaly" in docs["ml_risk_threshold"]
    assert "CRITICAL" in docs["critical_risk"]


# --- issue 17: the node's currency and its rates ----------------------------------------------


def test_currency_rates_from_a_toml_table_and_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text('currency = "EUR"\ncurrency_rates = {USD = 0.92, GBP = 1.17}\n')
    assert load(path, env={}).currency_rates == {"USD": 0.92, "GBP": 1.17}
    env = {"BRANCHGUARD_CURRENCY": "SEK", "BRANCHGUARD_CURRENCY_RATES": "EUR=11.2, NOK=0.98"}
    s = load(None, env=env)
    assert s.currency == "SEK" and s.currency_rates == {"EUR": 11.2, "NOK": 0.98}
    assert load(None, env={}).currency_rates == {}


@pytest.mark.parametrize(("env", "field"), [
    ({"BRANCHGUARD_CURRENCY": "XYZ"}, "currency"),
    ({"BRANCHGUARD_CURRENCY": "eur"}, "currency"),
    ({"BRANCHGUARD_CURRENCY_RATES": "XYZ=1.0"}, "currency_rates"),
    ({"BRANCHGUARD_CURRENCY_RATES": "EUR=1.0"}, "currency_rates"),  # the node's own
    ({"BRANCHGUARD_CURRENCY_RATES": "USD=0"}, "currency_rates"),
    ({"BRANCHGUARD_CURRENCY_RATES": "USD=-1"}, "currency_rates"),
    ({"BRANCHGUARD_CURRENCY_RATES": "USD=nan"}, "currency_rates"),
    ({"BRANCHGUARD_CURRENCY_RATES": "USD"}, "currency_rates"),
    ({"BRANCHGUARD_CURRENCY_RATES": "USD=cheap"}, "currency_rates"),
    ({"BRANCHGUARD_MAX_EVENT_LAG_DAYS": "0"}, "max_event_lag_days"),
    ({"BRANCHGUARD_MAX_CLOCK_SKEW_SECONDS": "-1"}, "max_clock_skew_seconds"),
])
def test_a_currency_or_window_that_cannot_work_is_refused(env: dict[str, str],
                                                          field: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load(None, env=env)
    assert caught.value.field == field


def test_every_setting_reaches_a_child_process_unchanged(tmp_path: Path) -> None:
    """A child of `branchguard run` (the API, the alert dispatcher) gets the node's settings
    as BRANCHGUARD_* variables (operations/child.py): each must read back as it was,
    including the tuples and the currency rates (a dict)."""
    import dataclasses

    from appliance.operations.child import settings_env

    for rates in ({}, {"USD": 0.92, "GBP": 1.17}):
        node = dataclasses.replace(load(None, env={}, data_dir=tmp_path), currency_rates=rates)
        env = {k: v for k, v in settings_env(node).items() if k.startswith("BRANCHGUARD_")}
        child = load(None, env=env)
        assert child == node
