"""Settings precedence (file < environment < flags) and one-sentence errors."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addons.access import Access
from addons.bounds import Bounds
from addons.capture import Capture
from addons.keypool import KeyPool
from addons.shutdown import Shutdown
from config import (
    ADDON_SETTINGS,
    BODY_MODES,
    BY_NAME,
    DEFAULT_CONFIG,
    ROOT,
    SETTINGS,
    STRATEGIES,
    ConfigError,
    Settings,
    load_settings,
)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "keyrotor.toml"
    path.write_text('[proxy]\nport = 9001\n[storage]\npath = "state/kr.db"\n')
    return path


def test_file_then_environment_then_flags(config_file):
    assert load_settings(config_file, environ={})["proxy.port"] == 9001
    assert load_settings(config_file, environ={"KEYROTOR_PROXY_PORT": "9002"})["proxy.port"] == 9002
    flags = {"proxy.port": "9003"}
    assert load_settings(config_file, flags, environ={"KEYROTOR_PROXY_PORT": "9002"})["proxy.port"] == 9003


def test_defaults_without_a_file(tmp_path):
    settings = load_settings(environ={})
    assert settings["keypool.strategy"] == "round_robin" and settings["ui.port"] == 8081


def test_relative_storage_path_is_beside_the_config_file(config_file, tmp_path, monkeypatch):
    assert load_settings(config_file, environ={}).storage_path == config_file.parent / "state/kr.db"
    monkeypatch.chdir(tmp_path)
    from_env = load_settings(config_file, environ={"KEYROTOR_STORAGE_PATH": "elsewhere.db"})
    assert from_env.storage_path == tmp_path / "elsewhere.db"


def test_the_prices_file_resolves_like_the_database(config_file, tmp_path, monkeypatch):
    assert load_settings(config_file, environ={})["capture.prices"] == str(ROOT / "prices.toml")  # the shipped one
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "prices.toml").write_text('["m"]\ninput = 1\noutput = 2\n')
    config_file.write_text(config_file.read_text() + '[capture]\nprices = "state/prices.toml"\n')
    assert load_settings(config_file, environ={})["capture.prices"] == str(tmp_path / "state" / "prices.toml")
    monkeypatch.chdir(tmp_path / "state")
    from_env = load_settings(config_file, environ={"KEYROTOR_CAPTURE_PRICES": "prices.toml"})
    assert from_env["capture.prices"] == str(tmp_path / "state" / "prices.toml")


@pytest.mark.parametrize(
    "content, names",
    [(None, ["does not exist"]), ('["gpt-4o"]\ninput = 2.5\n', ['model "gpt-4o"', 'lacks "output"'])],
)
def test_an_unusable_prices_file_stops_start_up(tmp_path, content, names):
    prices = tmp_path / "prices.toml"
    if content is not None:
        prices.write_text(content)
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"KEYROTOR_CAPTURE_PRICES": str(prices)})
    message = str(raised.value)
    assert all(n in message for n in ["capture.prices", "KEYROTOR_CAPTURE_PRICES", str(prices), *names]), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "environ, names",
    [
        ({"KEYROTOR_KEYPOOL_STRATEGY": "fastest"}, ["keypool.strategy", "KEYROTOR_KEYPOOL_STRATEGY", "round_robin"]),
        ({"KEYROTOR_PROXY_PORT": "70000"}, ["proxy.port", "65535"]),
        ({"KEYROTOR_UI_PORT": "http"}, ["ui.port", "whole number"]),
        ({"KEYROTOR_PROXY_UPSTREAM": "ftp://example.com"}, ["proxy.upstream", "http"]),
        ({"KEYROTOR_PROXY_UPSTREAM": "api.openai.com"}, ["proxy.upstream"]),
        ({"KEYROTOR_CAPTURE_BODIES": "some"}, ["capture.bodies", "truncated"]),
        ({"KEYROTOR_CAPTURE_MAX_BODY_BYTES": "-1"}, ["capture.max_body_bytes"]),
    ],
)
def test_bad_values_name_the_setting(environ, names):
    with pytest.raises(ConfigError) as raised:
        load_settings(environ=environ)
    message = str(raised.value)
    assert all(name in message for name in names), message
    assert message.count(".") >= 1 and "\n" not in message


@pytest.mark.parametrize(
    "content, names",
    [
        ("[proxy\nport=1", ["not valid TOML"]),
        ("[proxy]\nprot = 1\n", ["proxy.prot", "not a keyrotor setting"]),
        ("proxy = 3\n", ["proxy", "table"]),
    ],
)
def test_bad_files_are_refused(tmp_path, content, names):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})
    assert all(name in str(raised.value) for name in names)


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path, environ={})  # a directory: unreadable as a file, even for root


ABOVE_ZERO = "must be a whole number above zero"
ZERO_OR_MORE = "must be a whole number, zero or more"
# Each bad value, as a user would type it, and the reason its one sentence gives. The sentence is the
# same whether the value comes from config.toml, a KEYROTOR_* variable, a run.py flag or, for the
# settings the proxy's addons declare, the mitmproxy option <section>_<key> (mitmdump --set).
BAD_VALUES = [
    ("proxy.host", "  ", "must be a non-empty string"),
    ("proxy.port", "70000", "must be a port number from 1 to 65535"),
    ("proxy.port", "0", "must be a port number from 1 to 65535"),
    ("proxy.port", "80.5", "must be a whole number"),
    ("proxy.upstream", "ftp://example.com", "must be an http:// or https:// URL, like https://api.openai.com"),
    ("proxy.upstream", "api.openai.com", "must be an http:// or https:// URL, like https://api.openai.com"),
    ("proxy.web_port", "-1", "must be a port number from 1 to 65535"),
    ("proxy.stop_grace_seconds", "-1", ZERO_OR_MORE),
    ("proxy.max_body_bytes", "0", ABOVE_ZERO),
    ("proxy.header_timeout_seconds", "0", ABOVE_ZERO),
    ("proxy.workers", "0", 'must be a whole number above zero, or "auto" (one per core)'),
    ("proxy.workers", "many", 'must be a whole number above zero, or "auto" (one per core)'),
    ("ui.host", "", "must be a non-empty string"),
    ("ui.port", "http", "must be a whole number"),
    ("ui.trusted_proxies", "10.0.0.1, proxy.local", "must list IP addresses or networks; 'proxy.local' is neither"),
    ("access.trusted_proxies", "10.0.0.1 nginx", "must list IP addresses or networks; 'nginx' is neither"),
    ("storage.path", " ", "must be a non-empty string"),
    ("keypool.strategy", "fastest", 'must be one of "round_robin", "random", "least_used", "weighted"'),
    ("keypool.cooldown_seconds", "0", ABOVE_ZERO),
    ("keypool.max_cooldown_seconds", "0", ABOVE_ZERO),
    ("keypool.failure_threshold", "-3", ABOVE_ZERO),
    ("keypool.failure_cooldown_seconds", "0", ABOVE_ZERO),
    ("keypool.pool_429_window_seconds", "-1", ZERO_OR_MORE),
    ("keypool.max_attempts", "0", ABOVE_ZERO),
    ("keypool.wait_max_seconds", "-1", ZERO_OR_MORE),
    ("keypool.attempt_timeout_seconds", "0", ABOVE_ZERO),
    ("keypool.stream_idle_seconds", "0", ABOVE_ZERO),
    ("keypool.first_token_seconds", "-1", ZERO_OR_MORE),
    ("keypool.revalidate_seconds", "-900", ZERO_OR_MORE),
    ("keypool.revalidate_seconds", "soon", "must be a whole number"),
    ("capture.bodies", "some", 'must be one of "full", "truncated", "none"'),
    ("capture.max_body_bytes", "0", ABOVE_ZERO),
    ("capture.prices", "", "must be a non-empty string"),
    ("capture.keep_days", "-1", ZERO_OR_MORE),
    ("capture.max_rows", "-1", ZERO_OR_MORE),
    ("capture.max_gb", "-1", "must be a number, zero or more"),
    ("capture.max_gb", "nan", "must be a number, zero or more"),
    ("capture.max_gb", "lots", "must be a number"),
    ("capture.backlog_mb", "0", ABOVE_ZERO),
    ("access.ip_rpm", "-5", ZERO_OR_MORE),
    ("trace.host", " ", "must be a non-empty string"),
    ("trace.port", "65536", "must be a port number from 1 to 65535"),
    ("trace.public_url", "trace.example.com", "must be an http:// or https:// URL, like https://api.openai.com"),
    ("trace.grace_seconds", "-1", ZERO_OR_MORE),
    ("trace.ip_rpm", "0", ABOVE_ZERO),
    ("trace.schedule", "relay gpt-4o", "must list \"UPSTREAM/GROUP MODEL\" entries; 'relay gpt-4o' is not one"),
    ("trace.schedule_minutes", "0", ABOVE_ZERO),
    ("alerts.check_seconds", "0", ABOVE_ZERO),
    ("alerts.budget_percents", "most", "must be whole percentages above zero, like [80, 100]"),
    ("alerts.budget_percents", "80, 5000", "must be whole percentages above zero and at most 1000, like [80, 100]"),
    ("alerts.error_rate_percent", "-1", "must be a number, zero or more"),
    ("alerts.error_min_requests", "0", ABOVE_ZERO),
    ("alerts.error_window_minutes", "0", ABOVE_ZERO),
    ("alerts.send_attempts", "0", ABOVE_ZERO),
    ("otel.endpoint", "collector:4318", "must be an http:// or https:// URL, like https://api.openai.com"),
    ("otel.service_name", " ", "must be a non-empty string"),
    ("otel.timeout_seconds", "0", ABOVE_ZERO),
    ("otel.max_queue", "0", ABOVE_ZERO),
]
ADDON_OF = {
    "keypool": KeyPool,
    "capture": Capture,
    "access": Access,
    "proxy.stop_grace_seconds": Shutdown,
    "proxy.max_body_bytes": Bounds,
    "proxy.header_timeout_seconds": Bounds,
}


def toml_literal(value: str) -> str:
    """`value` as a user would write it in config.toml: a number bare, anything else quoted."""
    try:
        float(value)
    except ValueError:
        return json.dumps(value)
    return value


@pytest.mark.parametrize("value, workers", [("auto", os.cpu_count() or 1), ("AUTO", os.cpu_count() or 1), ("3", 3)])
def test_proxy_workers_takes_a_number_or_auto_for_every_core(value, workers):
    assert load_settings(overrides={"proxy.workers": value}, environ={})["proxy.workers"] == workers
    assert load_settings(environ={})["proxy.workers"] == 1  # one process unless asked


def test_the_table_covers_every_setting():
    secrets = {"ui.metrics_token", "alerts.webhook_url", "otel.headers", "redis.url", "storage.url"}  # see below
    assert {name for name, _, _ in BAD_VALUES} | secrets == set(BY_NAME)
    addon_settings = {name for name in BY_NAME if name.split(".")[0] in ADDON_OF or name in ADDON_OF}
    assert {s.name for s in ADDON_SETTINGS} == addon_settings


@pytest.mark.parametrize("name, value, reason", BAD_VALUES)
def test_a_bad_value_gives_one_sentence_from_every_source(tmp_path, name, value, reason):
    section, key = name.split(".")
    setting = BY_NAME[name]
    path = tmp_path / "keyrotor.toml"
    path.write_text(f"[{section}]\n{key} = {toml_literal(value)}\n")
    in_file = tomllib.loads(path.read_text())[section][key]
    for source, got, load in [
        (str(path), in_file, lambda: load_settings(path, environ={})),
        (setting.env_var, value, lambda: load_settings(environ={setting.env_var: value})),
        ("the command line", value, lambda: load_settings(overrides={name: value}, environ={})),
    ]:
        with pytest.raises(ConfigError) as raised:
            load()
        assert str(raised.value) == f"{name} {reason} (got {got!r} from {source}).", source


def reaches_the_addon(name: str, value: str) -> bool:
    # mitmproxy's --set itself refuses an int option's value that is no whole number.
    setting = BY_NAME[name]
    return setting in ADDON_SETTINGS and (type(setting.default) is not int or value.lstrip("-").isdigit())


@pytest.mark.parametrize("name, value, reason", [row for row in BAD_VALUES if reaches_the_addon(*row[:2])])
def test_a_bad_option_value_gives_the_same_sentence(name, value, reason):
    setting = BY_NAME[name]
    addon = ADDON_OF.get(name) or ADDON_OF[setting.section]
    with taddons.context(addon(load_settings(environ={}))) as tctx:
        option = tctx.options._options[setting.option]
        with pytest.raises(exceptions.OptionsError) as raised:
            tctx.options.set(f"{setting.option}={value}")  # what mitmdump --set does
        got = option.typespec(value)
        source = f"the mitmproxy option {setting.option}"
        assert str(raised.value) == f"{name} {reason} (got {got!r} from {source})."
        assert getattr(tctx.options, setting.option) == option.default  # refused, so rolled back


@pytest.mark.parametrize("name, choices", [("keypool.strategy", STRATEGIES), ("capture.bodies", BODY_MODES)])
def test_enumerated_options_declare_their_choices(name, choices):
    setting = BY_NAME[name]
    with taddons.context(ADDON_OF[setting.section]()) as tctx:
        assert tctx.options._options[setting.option].choices == choices  # mitmweb's options page offers them


def test_the_key_pools_options_are_declared_as_config_declares_their_settings():
    with taddons.context(KeyPool()) as tctx:
        for setting in (s for s in SETTINGS if s.section == "keypool"):
            option = tctx.options._options[setting.option]
            assert option.help and option.help == setting.help, setting.name  # mitmproxy's --options shows it
            assert option.typespec is type(setting.default) and option.default == setting.default


def test_a_secret_is_not_repeated_in_its_sentence():
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"KEYROTOR_UI_METRICS_TOKEN": "   "})
    assert str(raised.value) == "ui.metrics_token must be a non-empty string (from KEYROTOR_UI_METRICS_TOKEN)."


def test_a_bad_redis_url_is_not_repeated_and_a_good_one_is_kept():
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"KEYROTOR_REDIS_URL": "http://:s3cret@cache:6379"})
    assert str(raised.value) == (
        "redis.url must be a redis://, rediss:// or unix:// URL, like redis://127.0.0.1:6379/0"
        " (from KEYROTOR_REDIS_URL)."
    )
    url = "redis://:s3cret@cache:6379/0"
    assert load_settings(environ={"KEYROTOR_REDIS_URL": url}).redis.url == url
    assert load_settings(environ={}).redis.url == ""  # no Redis unless asked


def test_a_bad_webhook_url_is_not_repeated_and_budget_percents_read_as_a_list(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"KEYROTOR_ALERTS_WEBHOOK_URL": "hooks.slack.com/services/T0/B0/secret"})
    assert "secret" not in str(raised.value)
    assert str(raised.value).startswith("alerts.webhook_url must be an http:// or https:// URL")
    path = tmp_path / "keyrotor.toml"
    path.write_text('[alerts]\nbudget_percents = [100, 50, 80]\nwebhook_url = "https://example.com/hook"\n')
    loaded = load_settings(path, environ={})
    assert loaded.alerts.budget_percents == (50, 80, 100)
    assert loaded.alerts.webhook_url == "https://example.com/hook"
    assert load_settings(environ={"KEYROTOR_ALERTS_BUDGET_PERCENTS": "90"}).alerts.budget_percents == (90,)


def test_a_bad_storage_url_is_not_repeated_and_a_good_one_is_kept():
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"KEYROTOR_STORAGE_URL": "mysql://root:hunter2@db/keyrotor"})
    assert "hunter2" not in str(raised.value)
    assert str(raised.value).startswith("storage.url must be a postgresql:// URL")
    url = "postgresql://keyrotor:hunter2@db.internal:5432/keyrotor"
    assert load_settings(environ={"KEYROTOR_STORAGE_URL": url}).storage.url == url
    assert load_settings(environ={}).storage.url == ""  # SQLite at storage.path


def test_bad_collector_headers_are_not_repeated_and_good_ones_read_as_a_list_or_a_string(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"KEYROTOR_OTEL_HEADERS": "Bearer sekrit-token-123"})
    assert str(raised.value) == (
        'otel.headers must list "name=value" headers separated by commas (from KEYROTOR_OTEL_HEADERS).'
    )
    path = tmp_path / "keyrotor.toml"
    path.write_text('[otel]\nheaders = ["authorization=Bearer%20abc", " x-team = blue "]\n')
    assert load_settings(path, environ={}).otel.headers == "authorization=Bearer%20abc,x-team=blue"
    flagged = load_settings(overrides={"otel.headers": "a=1, b=2=3"}, environ={})
    assert flagged.otel.headers == "a=1,b=2=3"
    assert load_settings(environ={}).otel.endpoint == ""  # off unless asked


def test_trusted_proxies_are_read_from_a_list_a_string_a_variable_or_a_flag(tmp_path):
    path = tmp_path / "keyrotor.toml"
    path.write_text('[ui]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/8"]\n')
    assert load_settings(path, environ={}).ui.trusted_proxies == "127.0.0.1/32, 10.0.0.0/8"
    from_variable = load_settings(environ={"KEYROTOR_UI_TRUSTED_PROXIES": "::1 192.168.0.0/16"})
    assert from_variable["ui.trusted_proxies"] == "::1/128, 192.168.0.0/16"
    from_flag = load_settings(overrides={"ui.trusted_proxies": "10.1.2.3"}, environ={})
    assert from_flag.ui.trusted_proxies == "10.1.2.3/32"
    assert load_settings(environ={}).ui.trusted_proxies == ""  # by default no proxy is believed


def test_settings_are_typed_and_frozen(config_file):
    settings = load_settings(config_file, {"keypool.max_attempts": "5"}, environ={"KEYROTOR_CAPTURE_MAX_GB": "0.5"})
    assert isinstance(settings, Settings)
    assert settings.proxy.port == settings["proxy.port"] == 9001
    assert settings.keypool.max_attempts == 5 and settings.keypool.strategy == "round_robin"
    assert settings.capture.max_gb == 0.5 and settings.storage_path == config_file.parent / "state/kr.db"
    assert settings.values == {s.name: settings[s.name] for s in SETTINGS}
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.keypool.strategy = "random"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.proxy = settings.proxy  # type: ignore[misc]
    with pytest.raises(KeyError):
        settings["proxy.prot"]


def test_the_shipped_config_file_documents_every_setting():
    with DEFAULT_CONFIG.open("rb") as f:
        shipped = tomllib.load(f)
    assert [f"{section}.{key}" for section, table in shipped.items() for key in table] == [s.name for s in SETTINGS]
    assert load_settings(environ={}) == load_settings(DEFAULT_CONFIG, environ={})
