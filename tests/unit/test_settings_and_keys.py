"""Pure rules of settings, keys and per-project settings."""

from __future__ import annotations

import pytest

from profiles_cli.cli import run
from shared.errors import InvalidArgument
from shared.project_settings import PROJECT_SETTINGS, validate_setting, with_defaults
from shared.settings import SETTINGS, SettingInvalid, Settings
from shared.tenancy import hash_secret, secret_matches, split_key


def test_settings_read_every_documented_variable() -> None:
    env = {s.env: s.default for s in SETTINGS}
    env["PROFILES_QUERY_PORT"] = "60054"
    env["PROFILES_DB_POOL_SIZE"] = "3"
    settings = Settings.from_env(env)
    assert settings.ports["query"] == 60054
    assert settings.db_pool_size == 3
    assert Settings.from_env(settings.to_env()) == settings


def test_every_variable_the_settings_emit_is_documented() -> None:
    documented = {s.env for s in SETTINGS}
    assert set(Settings().to_env()) == documented


def test_no_variable_set_gives_the_same_settings_as_the_defaults_in_code() -> None:
    # Two places hold a default (SETTINGS for the environment, the dataclass for code and
    # tests): once, the tests ran with write partitions on while `profiles up` ran without.
    assert Settings.from_env({}) == Settings()


def test_defaults_use_the_contract_ports() -> None:
    assert Settings.from_env({}).ports == {
        "ingest": 50051,
        "identity": 50052,
        "segments": 50053,
        "query": 50054,
    }


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("prf_abc_secret", ("abc", "secret")),
        ("prf_abc_sec_ret", ("abc", "sec_ret")),
        ("prf__secret", None),
        ("prf_abc_", None),
        ("abc_secret", None),
        ("", None),
    ],
)
def test_split_key(key: str, expected: tuple[str, str] | None) -> None:
    assert split_key(key) == expected


def test_secret_matches_only_the_hashed_secret() -> None:
    stored = hash_secret("s3cret")
    assert secret_matches("s3cret", stored)
    assert not secret_matches("s3cret ", stored)


def test_project_settings_refuse_unknown_names_and_bad_values() -> None:
    validate_setting("identity.quarantine_days", 10)
    with pytest.raises(InvalidArgument) as unknown:
        validate_setting("identity.quarantine_dayz", 10)
    assert unknown.value.reason == "UNKNOWN_SETTING"
    for bad in (-1, "10", True, 10_000):
        with pytest.raises(InvalidArgument) as refused:
            validate_setting("identity.quarantine_days", bad)
        assert refused.value.violations[0].field == "value"
    with pytest.raises(InvalidArgument):
        validate_setting("identity.extra_junk_custom_ids", ["ok", ""])


def test_with_defaults_fills_every_known_setting() -> None:
    merged = with_defaults({"segments.new_days": 3})
    assert merged["segments.new_days"] == 3
    assert set(merged) == set(PROJECT_SETTINGS)


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("PROFILES_QUERY_PORT", "abc", "must be a whole number, not 'abc'"),
        ("PROFILES_QUERY_PORT", "70000", "must be from 1 to 65535, not 70000"),
        ("PROFILES_QUERY_PORT", "0", "must be from 1 to 65535, not 0"),
        ("PROFILES_EDGE_PORT", "-5", "must be from 1 to 65535, not -5"),
        ("PROFILES_DB_POOL_SIZE", "0", "must be from 1, not 0"),
        ("PROFILES_CLAIM_IDLE_SECONDS", "soon", "must be a number, not 'soon'"),
        ("PROFILES_BUS_WAIT_SECONDS", "0", "must be a number above 0, not '0'"),
        ("PROFILES_EDGE_RATE_LIMIT", "inf", "must be a number from 0"),
        ("PROFILES_CONSOLE_SECURE_COOKIES", "maybe", "must be true or false"),
    ],
)
def test_a_bad_setting_is_refused_by_its_name(name: str, value: str, words: str) -> None:
    with pytest.raises(SettingInvalid) as refused:
        Settings.from_env({name: value})
    assert str(refused.value).startswith(name)
    assert words in str(refused.value)


def test_metrics_ports_may_be_0_to_turn_them_off() -> None:
    settings = Settings.from_env(
        {"PROFILES_QUERY_METRICS_PORT": "0", "PROFILES_EDGE_METRICS_PORT": "0"}
    )
    assert settings.metrics_ports["query"] == 0
    assert settings.edge_metrics_port == 0


def test_the_cli_names_a_bad_setting_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROFILES_QUERY_PORT", "abc")
    assert run(["status"]) == 2
    assert capsys.readouterr().err == (
        "profiles: PROFILES_QUERY_PORT must be a whole number, not 'abc'\n"
    )
