"""Settings precedence (file < environment < flags) and one-sentence errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ROOT, ConfigError, load_settings


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
