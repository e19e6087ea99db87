"""Settings: config.toml, overridden by KEYROTOR_<SECTION>_<KEY> variables, overridden by flags.

Every setting is declared once, as a field of its section's frozen dataclass with its default
and its check (bounds, choices); config.toml documents the same names. load_settings builds
and checks them once. A bad value raises ConfigError with one sentence naming the setting and
where it came from, so start-up can print it and exit. The proxy's addons check their options
(<section>_<key>) with the same checks (checked_options), so `mitmdump --set` gets the same sentence.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.addresses import parse_networks
from core.prices import PriceFileError, PriceTable, load_prices
from core.toml_files import read_toml

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
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
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


def _non_negative_number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None
    if not number >= 0 or number == float("inf"):  # also refuses NaN
        raise ValueError("must be a number, zero or more")
    return number


def _workers(value: Any) -> int:
    """How many proxy processes: a whole number from 1, or "auto" (one per core)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        return _positive_integer(value)
    except ValueError:
        raise ValueError('must be a whole number above zero, or "auto" (one per core)') from None


def _networks(value: Any) -> str:
    """IP addresses or networks, from a TOML list or a comma-separated string; kept as one string."""
    return ", ".join(str(network) for network in parse_networks(value))


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


@dataclass(frozen=True)
class _OneOf:
    """The check of an enumerated setting; its addon option declares the same `choices`."""

    choices: tuple[str, ...]

    def __call__(self, value: Any) -> str:
        text = _text(value)
        if text not in self.choices:
            raise ValueError("must be one of " + ", ".join(f'"{c}"' for c in self.choices))
        return text


def _optional_text(value: Any) -> str:
    return "" if value in ("", None) else _text(value)


def _postgres_url(value: Any) -> str:
    """ "" (SQLite at storage.path) or a postgresql:// URL; its password is a secret, never repeated."""
    if value in ("", None):
        return ""
    url = _text(value)
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not (parts.hostname or "host=" in parts.query):
        raise ValueError("must be a postgresql:// URL, like postgresql://keyrotor:PASSWORD@db.internal:5432/keyrotor")
    return url


def _port_or_off(value: Any) -> int:
    return 0 if _integer(value) == 0 else _port(value)


def _optional_http_url(value: Any) -> str:
    return "" if value in ("", None) else _http_url(value)


def _trace_schedule(value: Any) -> str:
    """Scheduled trace probes: "UPSTREAM/GROUP MODEL" entries, from a TOML list or separated by commas."""
    items = value if isinstance(value, list) else str(value or "").split(",")
    entries = []
    for item in items:
        parts = str(item).split()
        if not parts:
            continue
        if len(parts) != 2 or parts[0].count("/") != 1 or "" in parts[0].split("/"):
            raise ValueError(f'must list "UPSTREAM/GROUP MODEL" entries; {str(item).strip()!r} is not one')
        entries.append(" ".join(parts))
    return ", ".join(entries)


def _otlp_headers(value: Any) -> str:
    """Headers for the OTLP collector: "name=value" pairs separated by commas (values may be
    %-encoded), as OTEL_EXPORTER_OTLP_HEADERS takes them; kept as that one string."""
    items = value if isinstance(value, list) else str(value or "").split(",")
    pairs = []
    for item in items:
        name, equals, text = str(item).strip().partition("=")
        if not str(item).strip():
            continue
        if not equals or not name.strip() or not all(c.isalnum() or c in "-_" for c in name.strip()):
            raise ValueError('must list "name=value" headers separated by commas')
        pairs.append(f"{name.strip()}={text.strip()}")
    return ",".join(pairs)


def _optional_redis_url(value: Any) -> str:
    """A Redis server's URL (redis://, rediss:// or unix://), or empty: no Redis (docs/redis.md)."""
    if value in ("", None):
        return ""
    url = _text(value)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ValueError("must be a redis://, rediss:// or unix:// URL, like redis://127.0.0.1:6379/0")
    return url


def masked_url(url: str) -> str:
    """`url` as it may be shown or logged: a password in it replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    return parts._replace(netloc=f"{user}***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")).geturl()


def setting[T](default: T, check: Callable[[Any], T], secret: bool = False, help: str = "") -> T:
    """A field of a settings section: its default, and the check that turns a raw value into it.
    A secret's value is never repeated in an error. `help`: the one line its addon option shows
    (config.toml documents it at length)."""
    return field(default=default, metadata={"check": check, "secret": secret, "help": help})


# One frozen dataclass per config.toml section. Each field is one setting: its name, type, default
# and check (its bounds or choices); config.toml documents the same names, in the same order.


@dataclass(frozen=True)
class ProxySettings:
    host: str = setting("127.0.0.1", _text)
    port: int = setting(8080, _port)
    upstream: str = setting("https://api.openai.com", _http_url)
    web_port: int = setting(8082, _port)
    stop_grace_seconds: int = setting(10, _non_negative_integer)
    max_body_bytes: int = setting(104_857_600, _positive_integer)
    header_timeout_seconds: int = setting(30, _positive_integer)
    workers: int = setting(1, _workers)  # docs/workers.md


@dataclass(frozen=True)
class UISettings:
    host: str = setting("127.0.0.1", _text)
    port: int = setting(8081, _port)
    metrics_token: str = setting("", _optional_text, secret=True)
    trusted_proxies: str = setting("", _networks)


@dataclass(frozen=True)
class StorageSettings:
    path: str = setting("data/keyrotor.db", _text)
    url: str = setting("", _postgres_url, secret=True)  # docs/postgresql.md


@dataclass(frozen=True)
class RedisSettings:
    url: str = setting("", _optional_redis_url, secret=True)  # docs/redis.md


@dataclass(frozen=True)
class KeyPoolSettings:
    strategy: str = setting(
        "round_robin", _OneOf(STRATEGIES), help=f"How the next upstream key is chosen: {', '.join(STRATEGIES)}."
    )
    cooldown_seconds: int = setting(
        60, _positive_integer, help="Seconds a key first rests after a 429 without Retry-After or x-ratelimit-reset-*."
    )
    max_cooldown_seconds: int = setting(3600, _positive_integer, help="Longest backoff a key can get, in seconds.")
    failure_threshold: int = setting(
        3, _positive_integer, help="5xx answers, timeouts or connection errors in a row that cool a key."
    )
    failure_cooldown_seconds: int = setting(
        30, _positive_integer, help="Seconds a key first rests when the failure threshold trips."
    )
    pool_429_window_seconds: int = setting(
        10,
        _non_negative_integer,
        help="429s on every usable key within this window cool the pool, not each key (0: off).",
    )
    max_attempts: int = setting(
        3, _positive_integer, help="Attempts per request, each with another key, before the client sees an error."
    )
    wait_max_seconds: int = setting(
        5, _non_negative_integer, help="How long a request may wait for a key to come back before a 503."
    )
    attempt_timeout_seconds: int = setting(
        600,
        _positive_integer,
        help="An attempt with no response headers, or no first byte, for this long is a timeout.",
    )
    stream_idle_seconds: int = setting(
        120, _positive_integer, help="A streamed answer silent for this long after its first byte is a timeout."
    )
    first_token_seconds: int = setting(
        0,
        _non_negative_integer,
        help="A stream with no first token this long after the request left is a timeout, retried elsewhere"
        " while nothing reached the client (0: off, attempt_timeout_seconds alone).",
    )
    revalidate_seconds: int = setting(
        900,
        _non_negative_integer,
        help="How often invalid and exhausted keys are probed with GET /v1/models (0: never).",
    )


@dataclass(frozen=True)
class CaptureSettings:
    bodies: str = setting("truncated", _OneOf(BODY_MODES))
    max_body_bytes: int = setting(1_048_576, _positive_integer)
    prices: str = setting("prices.toml", _text)
    keep_days: int = setting(30, _non_negative_integer)
    max_rows: int = setting(0, _non_negative_integer)
    max_gb: float = setting(0.0, _non_negative_number)
    backlog_mb: int = setting(256, _positive_integer)


@dataclass(frozen=True)
class AccessSettings:
    ip_rpm: int = setting(0, _non_negative_integer)
    trusted_proxies: str = setting("", _networks)  # whose X-Forwarded-For the proxy believes (docs/containers.md)


def _percents(value: Any) -> tuple[int, ...]:
    """Whole percentages from a TOML list or a comma-separated string, e.g. [80, 100]."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    try:
        percents = tuple(sorted({_positive_integer(str(v).strip()) for v in items if str(v).strip()}))
    except ValueError:
        raise ValueError("must be whole percentages above zero, like [80, 100]") from None
    if not percents or percents[-1] > 1000:
        raise ValueError("must be whole percentages above zero and at most 1000, like [80, 100]")
    return percents


@dataclass(frozen=True)
class AlertSettings:
    webhook_url: str = setting("", _optional_http_url, secret=True)
    check_seconds: int = setting(10, _positive_integer)
    budget_percents: tuple[int, ...] = setting((80, 100), _percents)
    error_rate_percent: float = setting(20.0, _non_negative_number)
    error_min_requests: int = setting(20, _positive_integer)
    error_window_minutes: int = setting(5, _positive_integer)
    send_attempts: int = setting(3, _positive_integer)


@dataclass(frozen=True)
class TraceSettings:
    # Trace probes (docs/traces.md): the listener that serves their images, off while port is 0.
    host: str = setting("127.0.0.1", _text)
    port: int = setting(0, _port_or_off)
    public_url: str = setting("", _optional_http_url)
    grace_seconds: int = setting(10, _non_negative_integer)
    ip_rpm: int = setting(30, _positive_integer)
    schedule: str = setting("", _trace_schedule)
    schedule_minutes: int = setting(1440, _positive_integer)


@dataclass(frozen=True)
class OtelSettings:
    # OpenTelemetry traces (docs/otel.md): off while endpoint is "". Read when the proxy starts.
    endpoint: str = setting("", _optional_http_url)
    service_name: str = setting("keyrotor", _text)
    headers: str = setting("", _otlp_headers, secret=True)
    timeout_seconds: int = setting(10, _positive_integer)
    max_queue: int = setting(2048, _positive_integer)


@dataclass(frozen=True)
class Settings:
    """Every setting, resolved and checked once by load_settings; `settings.keypool.strategy`,
    or by name: `settings["keypool.strategy"]`."""

    proxy: ProxySettings = field(default_factory=ProxySettings)
    ui: UISettings = field(default_factory=UISettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    keypool: KeyPoolSettings = field(default_factory=KeyPoolSettings)
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    trace: TraceSettings = field(default_factory=TraceSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    otel: OtelSettings = field(default_factory=OtelSettings)
    config_path: Path | None = None

    def __getitem__(self, name: str) -> Any:
        if name not in BY_NAME:
            raise KeyError(name)
        section, _, key = name.partition(".")
        return getattr(getattr(self, section), key)

    @property
    def values(self) -> dict[str, Any]:
        """Every setting by name (`section.key`)."""
        return {s.name: self[s.name] for s in SETTINGS}

    @property
    def storage_path(self) -> Path:
        return Path(self.storage.path)


SECTIONS: dict[str, type] = {
    "proxy": ProxySettings,
    "ui": UISettings,
    "storage": StorageSettings,
    "redis": RedisSettings,
    "keypool": KeyPoolSettings,
    "capture": CaptureSettings,
    "access": AccessSettings,
    "trace": TraceSettings,
    "alerts": AlertSettings,
    "otel": OtelSettings,
}


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    default: Any
    parse: Callable[[Any], Any]
    secret: bool = False
    help: str = ""

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The values an enumerated setting takes (None: any its check accepts)."""
        return self.parse.choices if isinstance(self.parse, _OneOf) else None

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def env_var(self) -> str:
        return f"KEYROTOR_{self.section}_{self.key}".upper()

    @property
    def option(self) -> str:
        """The mitmproxy option an addon declares for it."""
        return f"{self.section}_{self.key}"

    def check(self, raw: Any, source: str) -> Any:
        """`raw` as this setting's value; ConfigError, one sentence naming the setting and `source`, if it is bad."""
        try:
            return self.parse(raw)
        except ValueError as e:
            got = "" if self.secret else f"got {raw!r} "
            raise ConfigError(f"{self.name} {e} ({got}from {source}).") from None


SETTINGS = [
    Setting(section, f.name, f.default, f.metadata["check"], f.metadata["secret"], f.metadata["help"])
    for section, cls in SECTIONS.items()
    for f in fields(cls)
]
BY_NAME = {s.name: s for s in SETTINGS}
# Settings the proxy's addons declare as mitmproxy options named <section>_<key>.
ADDON_SETTINGS = [
    s
    for s in SETTINGS
    if s.section in ("keypool", "capture", "access")
    or s.name in ("proxy.stop_grace_seconds", "proxy.max_body_bytes", "proxy.header_timeout_seconds")
]


def default_of(settings: Settings | None, name: str) -> Any:
    """An addon option's default: the resolved setting when keyrotor.py passed them, else the built-in one."""
    return settings[name] if settings else BY_NAME[name].default


def names_in(section: str) -> list[str]:
    """The names (`section.key`) of a section's settings."""
    return [s.name for s in SETTINGS if s.section == section]


def settings_in(section: str) -> list[Setting]:
    """A section's settings, in config.toml's order."""
    return [s for s in SETTINGS if s.section == section]


def option_source(option: str) -> str:
    # An option is set by --set on mitmdump, in mitmproxy's config.yaml or in mitmweb's options.
    return f"the mitmproxy option {option}"


def checked_options(options: Any, updated: Collection[str], names: Iterable[str]) -> dict[str, Any]:
    """The values of the addon options among `updated` for the settings `names`, checked as load_settings
    checks them: a bad one raises ConfigError with the same sentence, naming the option as its source."""
    checked = {}
    for name in names:
        setting = BY_NAME[name]
        if setting.option in updated:
            checked[name] = setting.check(getattr(options, setting.option), option_source(setting.option))
    return checked


def read_prices(path: str | Path, source: str) -> PriceTable:
    """The capture.prices file; ConfigError naming the setting and `source` when it cannot be used."""
    try:
        return load_prices(Path(path).expanduser())
    except PriceFileError as e:
        raise ConfigError(f"capture.prices (from {source}): {e}") from None


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
        values[setting.name] = setting.check(raw, source)

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
    # Read here too, so that a broken prices file stops start-up rather than only the capture addon.
    read_prices(values["capture.prices"], sources["capture.prices"])
    sections = {
        section: cls(**{s.key: values[s.name] for s in SETTINGS if s.section == section})
        for section, cls in SECTIONS.items()
    }
    return Settings(**sections, config_path=path if path.exists() else None)


def _read_toml(path: Path, required: bool) -> dict[str, Any]:
    if not path.exists() and not required:
        return {}
    return read_toml(path, "config file", ConfigError)


def _check_unknown(from_file: dict[str, Any], path: Path) -> None:
    # A misspelt setting silently falling back to its default is worse than refusing to start.
    for section, table in from_file.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{section} in {path} must be a [section] table.")
        for key in table:
            if f"{section}.{key}" not in BY_NAME:
                raise ConfigError(f"{section}.{key} in {path} is not a keyrotor setting.")
