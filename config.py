"""Settings: config.toml, overridden by KEYROTOR_<SECTION>_<KEY> variables, overridden by flags.

Every setting is declared once in SETTINGS; config.toml documents the same names.
A bad value raises ConfigError with one sentence naming the setting and where it
came from, so start-up can print it and exit.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.prices import PriceFileError, load_prices

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "config.toml"

STRATEGIES = ("round_robin", "random", "least_used", "weighted")
BODY_MODES = ("full", "truncated", "none")


class ConfigError(Exception):
    """A setting is missing, malformed or out of range; the message names it."""


def _port(value: Any) -> int:
    port = _integer(value)
    if not 1 <= port <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return port


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be a whole number")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError("must be a whole number") from None


def _positive_integer(value: Any) -> int:
    number = _integer(value)
    if number <= 0:
        raise ValueError("must be a whole number above zero")
    return number


def _non_negative_integer(value: Any) -> int:
    number = _integer(value)
    if number < 0:
        raise ValueError("must be a whole number, zero or more")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def _http_url(value: Any) -> str:
    url = _text(value).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL, like https://api.openai.com")
    return url


def parse_http_url(value: Any) -> str:
    """An upstream's base URL as given on the command line or in the UI; ValueError says what is wrong."""
    try:
        return _http_url(value)
    except ValueError as e:
        raise ValueError(f"{value!r} {e}") from None


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _text(value)
        if text not in choices:
            raise ValueError("must be one of " + ", ".join(f'"{c}"' for c in choices))
        return text

    return check


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    default: Any
    parse: Callable[[Any], Any]

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def env_var(self) -> str:
        return f"KEYROTOR_{self.section}_{self.key}".upper()


SETTINGS = [
    Setting("proxy", "host", "127.0.0.1", _text),
    Setting("proxy", "port", 8080, _port),
    Setting("proxy", "upstream", "https://api.openai.com", _http_url),
    Setting("proxy", "web_port", 8082, _port),
    Setting("proxy", "stop_grace_seconds", 10, _non_negative_integer),
    Setting("proxy", "max_body_bytes", 104_857_600, _positive_integer),
    Setting("proxy", "header_timeout_seconds", 30, _positive_integer),
    Setting("ui", "host", "127.0.0.1", _text),
    Setting("ui", "port", 8081, _port),
    Setting("ui", "metrics_token", "", lambda v: "" if v in ("", None) else _text(v)),
    Setting("storage", "path", "data/keyrotor.db", _text),
    Setting("keypool", "strategy", "round_robin", _one_of(*STRATEGIES)),
    Setting("keypool", "cooldown_seconds", 60, _positive_integer),
    Setting("keypool", "max_cooldown_seconds", 3600, _positive_integer),
    Setting("keypool", "failure_threshold", 3, _positive_integer),
    Setting("keypool", "failure_cooldown_seconds", 30, _positive_integer),
    Setting("keypool", "pool_429_window_seconds", 10, _non_negative_integer),
    Setting("keypool", "max_attempts", 3, _positive_integer),
    Setting("keypool", "wait_max_seconds", 5, _non_negative_integer),
    Setting("keypool", "attempt_timeout_seconds", 600, _positive_integer),
    Setting("keypool", "stream_idle_seconds", 120, _positive_integer),
    Setting("keypool", "revalidate_seconds", 900, _non_negative_integer),
    Setting("capture", "bodies", "truncated", _one_of(*BODY_MODES)),
    Setting("capture", "max_body_bytes", 1_048_576, _positive_integer),
    Setting("capture", "prices", "prices.toml", _text),
    Setting("capture", "keep_days", 30, _non_negative_integer),
    Setting("capture", "max_rows", 0, _non_negative_integer),
    Setting("capture", "backlog_mb", 256, _positive_integer),
    Setting("access", "ip_rpm", 0, _non_negative_integer),
]
BY_NAME = {s.name: s for s in SETTINGS}
# Settings the proxy's addons declare as mitmproxy options named <section>_<key>.
ADDON_SETTINGS = [
    s
    for s in SETTINGS
    if s.section in ("keypool", "capture", "access")
    or s.name in ("proxy.stop_grace_seconds", "proxy.max_body_bytes", "proxy.header_timeout_seconds")
]


@dataclass(frozen=True)
class Settings:
    values: Mapping[str, Any]
    config_path: Path | None

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @property
    def storage_path(self) -> Path:
        return Path(self.values["storage.path"])


def default_of(settings: Settings | None, name: str) -> Any:
    """An addon option's default: the resolved setting when keyrotor.py passed them, else the built-in one."""
    return settings[name] if settings else BY_NAME[name].default


def load_settings(
    config_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve every setting from file, then environment, then `overrides` (flags)."""
    environ = os.environ if environ is None else environ
    explicit = config_path or environ.get("KEYROTOR_CONFIG")
    path = Path(explicit) if explicit else DEFAULT_CONFIG
    from_file = _read_toml(path, required=bool(explicit))
    _check_unknown(from_file, path)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        raw, source = setting.default, "the default"
        if setting.key in from_file.get(setting.section, {}):
            raw, source = from_file[setting.section][setting.key], str(path)
        if setting.env_var in environ:
            raw, source = environ[setting.env_var], setting.env_var
        if overrides and overrides.get(setting.name) is not None:
            raw, source = overrides[setting.name], "the command line"
        sources[setting.name] = source
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{setting.name} {e} (got {raw!r} from {source}).") from None

    # Relative paths in the file mean "beside the file", and so does the default database: the
    # proxy and `run.py keys ...` started from different directories must find the same one.
    # In a variable or a flag they mean the working directory, as a shell user expects. The
    # default price table is the one shipped with keyrotor, wherever keyrotor is started from.
    for name, default_base in (("storage.path", path.parent), ("capture.prices", ROOT)):
        value = Path(values[name]).expanduser()
        if not value.is_absolute():
            bases = {str(path): path.parent, "the default": default_base}
            value = bases.get(sources[name], Path.cwd()) / value
        values[name] = str(value)
    try:
        # Read here too, so that a broken prices file stops start-up rather than only the capture addon.
        load_prices(values["capture.prices"])
    except PriceFileError as e:
        raise ConfigError(f"capture.prices (from {sources['capture.prices']}): {e}") from None
    return Settings(values=values, config_path=path if path.exists() else None)


def _read_toml(path: Path, required: bool) -> dict[str, Any]:
    if not path.exists() and not required:
        return {}
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}.") from None


def _check_unknown(from_file: dict[str, Any], path: Path) -> None:
    # A misspelt setting silently falling back to its default is worse than refusing to start.
    for section, table in from_file.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{section} in {path} must be a [section] table.")
        for key in table:
            if f"{section}.{key}" not in BY_NAME:
                raise ConfigError(f"{section}.{key} in {path} is not a keyrotor setting.")
