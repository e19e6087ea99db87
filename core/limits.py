"""Client limits and the decision on each request: allowed, or refused and why.

Everything here is pure: a `Governor` decides over the `Counters` port (core/ports.py),
which holds the numbers. Exactness comes from how it is called: `admit()` reads every
counter a request touches and, only when all of them allow it, adds to them, in one
synchronous call. The proxy's hooks all run on one event loop, so nothing can run
between the check and the add: a limit of N lets exactly N through however many
requests arrive at once (a shared backend, Redis, would do the same in one script).

Windows: requests and tokens per minute are moving windows of 60 s (each admitted request
is an entry that leaves the window 60 s after it came), budgets are UTC calendar days and
months, parallel requests a gauge. Tokens per minute reserve the request's estimate
(prompt length and max_tokens) while it runs and are settled to what upstream reported.

Budgets reserve too, so that requests in flight at once cannot overrun one: admission holds
each request's estimate (its prompt, plus max_tokens or the model's default output, priced
for a USD budget) against every budget of its client until the request settles, and a budget
with reservations in flight refuses a request that would take it past its limit. A request
that finds nothing reserved is admitted while the budget is not spent (as one always was): a
budget is overrun by at most one request's worth.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
from collections.abc import MutableMapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from core.errors import OpenAIError
from core.prices import PriceTable
from core.request_model import batch_input_files, batch_models, batch_upload_purpose

if TYPE_CHECKING:
    from core.ports import Counters

log = logging.getLogger(__name__)

MINUTE = 60.0
TOKEN_BYTES = 4  # a prompt's tokens, estimated from its length: about four bytes a token
Network = ipaddress.IPv4Network | ipaddress.IPv6Network  # an IP allowlist entry, parsed


@dataclass(frozen=True)
class ClientPolicy:
    """A client's limits; None (or an empty tuple) means no limit of that kind."""

    models: tuple[str, ...] = ()  # exact names and * wildcards
    groups: tuple[str, ...] = ()  # UPSTREAM/GROUP labels it may be served by
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    daily_usd: float | None = None
    monthly_usd: float | None = None
    expires_at: float | None = None
    ips: tuple[str, ...] = ()  # addresses and CIDR ranges, v4 and v6

    @property
    def counts_tokens(self) -> bool:
        """Whether responses must be read for their usage: a token limit or a budget is set."""
        return any(
            v is not None for v in (self.tpm, self.daily_tokens, self.monthly_tokens, self.daily_usd, self.monthly_usd)
        )

    @property
    def has_budget(self) -> bool:
        return any(v is not None for v in (self.daily_tokens, self.monthly_tokens, self.daily_usd, self.monthly_usd))

    @property
    def is_limited(self) -> bool:
        return self != NO_LIMITS


NO_LIMITS = ClientPolicy()
LIMIT_FIELDS = tuple(f.name for f in fields(ClientPolicy))
LIST_FIELDS = ("models", "groups", "ips")
INTEGER_FIELDS = ("rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens")
USD_FIELDS = ("daily_usd", "monthly_usd")


class CountersUnavailable(Exception):
    """Shared counters cannot be read or written right now (storage busy or failing): the Governor refuses
    rather than admit a request it could not count."""


class LimitError(ValueError):
    """A limit given by an admin does not parse; the message says which and why."""


def parse_limit(name: str, text: str | None) -> Any:
    """One limit as the CLI, UI and API give it (text); 'none' or empty clears it."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return () if name in LIST_FIELDS else None
    text = str(text).strip()
    if name in LIST_FIELDS:
        items = tuple(dict.fromkeys(i.strip() for i in text.split(",") if i.strip()))
        if name == "ips":
            for item in items:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise LimitError(f"ips: {item!r} is not an IP address or CIDR range (10.0.0.0/8, ::1).") from None
        if name == "groups":
            for item in items:
                if item.count("/") != 1:
                    raise LimitError(f"groups: {item!r} must be an UPSTREAM/GROUP label.")
        return items
    if name in INTEGER_FIELDS:
        if not text.isdecimal() or int(text) < 1:
            raise LimitError(f"{name.replace('_', '-')} must be a whole number from 1, or none (got {text!r}).")
        return int(text)
    if name in USD_FIELDS:
        try:
            value = float(text.removeprefix("$"))
        except ValueError:
            value = -1.0
        if not 0 < value < math.inf:
            raise LimitError(f"{name.replace('_', '-')} must be US dollars above 0, or none (got {text!r}).")
        return value
    if name == "expires_at":
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise LimitError(
                f"expires must be an ISO date or time, like 2026-12-31 or 2026-12-31T18:00Z (got {text!r})."
            ) from None
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    raise LimitError(f"no limit named {name!r}")


def policy_with(policy: ClientPolicy, changes: dict[str, str | None]) -> ClientPolicy:
    """`policy` with the limits in `changes` (text, as given) parsed and replaced."""
    return replace(policy, **{name: parse_limit(name, value) for name, value in changes.items()})


def model_allowed(patterns: tuple[str, ...], model: str | None) -> bool:
    if not patterns:
        return True
    if model is None:
        return True  # a request without a model (GET /v1/models, files): nothing to allow or refuse
    return any(_pattern(p).fullmatch(model) for p in patterns)


_patterns: dict[str, re.Pattern[str]] = {}


def _pattern(text: str) -> re.Pattern[str]:
    found = _patterns.get(text)
    if found is None:
        found = _patterns[text] = re.compile(".*".join(re.escape(part) for part in text.split("*")))
    return found


def ip_allowed(networks: tuple[Network, ...], address: str | None) -> bool:
    if not networks:
        return True
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:  # a dual-stack listener shows v4 clients as ::ffff:a.b.c.d
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in networks)


def networks_of(ips: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(i, strict=False) for i in ips)


def estimate_tokens(body: bytes) -> int:
    """What a request may cost in tokens before it runs: its length, plus the output it asks for at most."""
    estimate = len(body) // TOKEN_BYTES
    for name in (b'"max_tokens"', b'"max_completion_tokens"', b'"max_output_tokens"'):
        at = body.find(name)
        if at >= 0:
            found = _NUMBER_AFTER.match(body, at + len(name))
            if found:
                estimate += int(found.group(1))
                break
    return estimate


_NUMBER_AFTER = re.compile(rb"\s*:\s*(\d{1,9})")

# The most a request may generate when it sets no max_tokens: the model's own output limit
# (first matching prefix), else DEFAULT_OUTPUT_TOKENS. What a budget reserves for it.
MODEL_OUTPUT_TOKENS: tuple[tuple[str, int], ...] = (
    ("gpt-5", 128_000),
    ("o1-mini", 65_536),
    ("o1", 100_000),
    ("o3", 100_000),
    ("o4", 100_000),
    ("gpt-4.1", 32_768),
    ("gpt-4o", 16_384),
    ("chatgpt-4o", 16_384),
    ("gpt-4-turbo", 4_096),
    ("gpt-4", 8_192),
    ("gpt-3.5", 4_096),
)
DEFAULT_OUTPUT_TOKENS = 16_384
# Endpoints that generate text; others (embeddings, moderations) cost their input only.
GENERATING = ("/chat/completions", "/completions", "/responses")


def output_allowance(model: str | None, body: bytes) -> int:
    """The most output the request asks for: its max_tokens (or the newer names), else its model's default."""
    for name in (b'"max_tokens"', b'"max_completion_tokens"', b'"max_output_tokens"'):
        at = body.find(name)
        if at >= 0:
            found = _NUMBER_AFTER.match(body, at + len(name))
            if found:
                return int(found.group(1))
    for prefix, tokens in MODEL_OUTPUT_TOKENS:
        if model is not None and model.startswith(prefix):
            return tokens
    return DEFAULT_OUTPUT_TOKENS


def reservation(path: str, model: str | None, body: bytes) -> tuple[int, int]:
    """(prompt, output) tokens a budget holds for a request while it runs; (0, 0) for what is not a JSON request."""
    if body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return 0, 0  # no body (GET, a Realtime upgrade) or a multipart upload: nothing generated from it
    prompt = len(body) // TOKEN_BYTES
    if path.partition("?")[0].endswith(GENERATING):
        return prompt, output_allowance(model, body)
    return prompt, 0


# ---------------------------------------------------------------------------- calendar


# (day start, next day, day key, month key): strftime per day, not per call
_calendar: list[tuple[float, float, str, str]] = [(0.0, 0.0, "", "")]


def _keys(now: float) -> tuple[str, str]:
    start, end, day, month = _calendar[0]
    if not start <= now < end:
        moment = datetime.fromtimestamp(now, UTC)
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        day, month = moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m")
        _calendar[0] = (start, start + 86400, day, month)
    return day, month


def day_key(now: float) -> str:
    return _keys(now)[0]


def month_key(now: float) -> str:
    return _keys(now)[1]


def next_day(now: float) -> float:
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day + timedelta(days=1)).timestamp()


def next_month(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def spend_name(client_id: int, unit: str, period: str, now: float) -> str:
    """The counter of a client's spend in `unit` (tokens, usd) this `period` (day, month)."""
    day, month = _keys(now)
    return f"spend:{client_id}:{unit}:{period}:{day if period == 'day' else month}"


# ---------------------------------------------------------------------------- decisions


@dataclass
class Ticket:
    """An admitted request's share of its client's counters, settled when it ends."""

    client_id: int
    policy: ClientPolicy
    model: str | None
    admitted_at: float
    tokens_entry: Any = None  # the TPM window's entry holding the estimate
    parallel: bool = False
    settled: bool = False
    reservations: tuple[tuple[str, float], ...] = ()  # (spend counter, amount held) until it settles


@dataclass(frozen=True)
class Refusal:
    code: str  # model_not_allowed, rate_limit_exceeded, insufficient_quota, key_expired, ip_not_allowed
    error: OpenAIError

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.error.message}"


# Endpoints that mint a short-lived upstream key (OpenAI's Realtime client secrets and sessions). A browser
# then talks to upstream with it directly, so nothing it does passes a limit, a budget or the capture.
EPHEMERAL_KEY_PATHS = (
    "/v1/realtime/client_secrets",
    "/v1/realtime/sessions",
    "/v1/realtime/transcription_sessions",
    "/openai/realtimeapi/sessions",  # Azure's
)


def mints_upstream_credentials(path: str) -> bool:
    """Whether a request to `path` (query included) asks upstream for an ephemeral key."""
    return path.split("?", 1)[0].rstrip("/").endswith(EPHEMERAL_KEY_PATHS)


def is_upload(method: str, path: str) -> bool:
    """Whether a request may upload a batch's input file: POST to /files (multipart) or /uploads (JSON)."""
    return method == "POST" and path.split("?", 1)[0].rstrip("/").endswith(("/files", "/uploads"))


def upload_refusal(patterns: tuple[str, ...], path: str, content_type: str, body: bytes) -> Refusal | None:
    """Refuse an upload (`is_upload`) that would start a batch running models outside `patterns`.

    A batch's input file names a model on each line, and upstream runs each: a file for a batch
    (purpose `batch`) is read line by line here. The Uploads API sends a file in parts, in separate
    requests, so what it would hold cannot be read as a whole: its batch uploads are refused instead.
    """
    if not patterns:
        return None
    if path.split("?", 1)[0].rstrip("/").endswith("/uploads"):
        if not batch_upload_purpose(body):
            return None
        return refused(
            403,
            "model_not_allowed",
            "This client key may use only some models (allowed: " + ", ".join(patterns) + "), and a batch's input"
            " file sent through the Uploads API (in parts) cannot be checked for them: upload it with"
            " POST /v1/files (purpose 'batch') instead.",
            "invalid_request_error",
            {"x-should-retry": "false"},
        )
    if "multipart/form-data" not in content_type.lower():
        return None
    files = batch_input_files(content_type, body)
    if isinstance(files, OpenAIError):
        return Refusal(files.code or "invalid_model", files)
    for data in files:
        refusal = batch_input_refusal(patterns, data)
        if refusal is not None:
            return refusal
    return None


def batch_input_refusal(patterns: tuple[str, ...], data: bytes) -> Refusal | None:
    """Refuse a batch's input file (JSON Lines) when a line names a model outside `patterns`, or none readably."""
    if not patterns:
        return None
    models = batch_models(data)
    if isinstance(models, OpenAIError):
        return Refusal(models.code or "invalid_model", models)
    for number, model in models:
        if not model_allowed(patterns, model):
            return refused(
                403,
                "model_not_allowed",
                f"This client key may not use the model {model!r}, which line {number} of the batch input file names"
                f" (allowed: {', '.join(patterns)}).",
                "invalid_request_error",
                {"x-should-retry": "false"},
            )
    return None


def refused(status: int, code: str, message: str, kind: str, headers: dict[str, str] | None = None) -> Refusal:
    return Refusal(code, OpenAIError(status, message, kind, code, headers or {}))


def duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* form: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Governor:
    """Decides over `counters`; one per proxy, shared by the hooks that admit and settle requests."""

    counters: Counters
    ip_rpm: int = 0
    tickets: dict[str, Ticket] = field(default_factory=dict)  # by flow id
    prices: PriceTable = field(default_factory=PriceTable)  # for USD budgets' reservations (the Spend addon's)
    # spend counter → what requests in flight hold (with workers, every worker's: storage/workers.SharedHolds)
    reserved: MutableMapping[str, float] = field(default_factory=dict)
    _names: dict[int, tuple[str, dict[str, str]]] = field(default_factory=dict)  # client → (day, spend names)

    def spend_names(self, client_id: int, now: float) -> dict[str, str]:
        """spend_names(), made once per client and day rather than on every request."""
        day = day_key(now)
        cached = self._names.get(client_id)
        if cached is None or cached[0] != day:
            cached = self._names[client_id] = (day, spend_names(client_id, now))
        return cached[1]

    # The checks that need no body, as soon as the headers arrive.
    @staticmethod
    def check_key(
        policy: ClientPolicy, networks: tuple[Network, ...], address: str | None, now: float
    ) -> Refusal | None:
        if policy.expires_at is not None and now >= policy.expires_at:
            return refused(
                401,
                "key_expired",
                f"This client key expired at {_iso(policy.expires_at)}; ask the gateway's admin for a new expiry"
                " (run.py clients set NAME --expires DATE).",
                "invalid_request_error",
                {"x-should-retry": "false"},
            )
        if not ip_allowed(networks, address):
            return refused(
                403,
                "ip_not_allowed",
                f"Requests from {address} are not allowed for this client key.",
                "invalid_request_error",
                {"x-should-retry": "false"},
            )
        return None

    def admit(
        self,
        flow_id: str,
        client_id: int,
        policy: ClientPolicy,
        model: str | None,
        body: bytes,
        address: str | None,
        now: float,
        serving: tuple[str, ...] | None = None,
        path: str = "",
    ) -> Refusal | Ticket:
        """Refuse the request, or take its share of every counter and return its ticket.

        `serving`: the UPSTREAM/GROUP labels of the groups that serve `model`, when the policy limits groups.
        `path`: the request's, to tell what generates output (and so reserves its budget) from what does not.
        """
        try:
            with self.counters.atomic():  # with workers, one transaction: exact whichever worker admits
                return self._admit(flow_id, client_id, policy, model, body, address, now, serving, path)
        except CountersUnavailable as e:
            log.warning("refusing a request of client %d: its limits cannot be counted (%s)", client_id, e)
            self.tickets.pop(flow_id, None)
            return refused(
                503,
                "limits_unavailable",
                "This client's limits cannot be counted right now (the gateway's shared counters are busy);"
                " retry after the Retry-After seconds.",
                "server_error",
                {"retry-after": "1"},
            )

    def _admit(
        self,
        flow_id: str,
        client_id: int,
        policy: ClientPolicy,
        model: str | None,
        body: bytes,
        address: str | None,
        now: float,
        serving: tuple[str, ...] | None,
        path: str,
    ) -> Refusal | Ticket:
        if policy.is_limited and mints_upstream_credentials(path):
            return refused(
                403,
                "ephemeral_key_not_allowed",
                "This client key has limits, and an ephemeral Realtime key would reach upstream directly, outside"
                " them (its model, budget and rate limits unchecked): connect to /v1/realtime through this gateway"
                " instead.",
                "invalid_request_error",
                {"x-should-retry": "false"},
            )
        if not model_allowed(policy.models, model):
            return refused(
                403,
                "model_not_allowed",
                f"This client key may not use the model {model!r} (allowed: {', '.join(policy.models)}).",
                "invalid_request_error",
                {"x-should-retry": "false"},
            )
        if policy.groups and model is not None and serving is not None and not any(g in policy.groups for g in serving):
            return refused(
                403,
                "model_not_allowed",
                f"None of the upstream groups this client key may use ({', '.join(policy.groups)}) serves the model"
                f" {model!r}.",
                "invalid_request_error",
                {"x-should-retry": "false"},
            )
        counters = self.counters
        holds = self._holds(client_id, policy, model, body, path, now)
        spent = self._over_budget(client_id, policy, now, holds)
        if spent is not None:
            return spent
        checks: list[tuple[str, float, int]] = []  # (window, amount to add, limit)
        if policy.rpm is not None:
            checks.append((f"rpm:{client_id}", 1, policy.rpm))
        estimate = 0
        if policy.tpm is not None:
            estimate = min(
                estimate_tokens(body), policy.tpm
            )  # a request larger than the limit waits for an empty window
            checks.append((f"tpm:{client_id}", estimate, policy.tpm))
        if self.ip_rpm and address:
            checks.append((f"ip:{address}", 1, self.ip_rpm))
        for name, amount, limit in checks:
            total, oldest = counters.moving_total(name, MINUTE, now)
            if total + amount > limit:
                wait = max(0.001, (oldest + MINUTE - now) if oldest is not None else MINUTE)
                return self._rate_limited(client_id, policy, name, limit, wait, now)
        parallel_name = f"parallel:{client_id}"
        if policy.max_parallel is not None and counters.gauge(parallel_name) >= policy.max_parallel:
            return refused(
                429,
                "rate_limit_exceeded",
                f"Rate limit reached: at most {policy.max_parallel} requests of this client at once;"
                " retry when one ends.",
                "requests",
                {"retry-after": "1"},
            )
        ticket = self.count(flow_id, client_id, policy, model, now)
        reserved = self.reserved
        for name, amount in holds:
            reserved[name] = reserved.get(name, 0.0) + amount
        ticket.reservations = holds
        for name, amount, _ in checks:
            entry = counters.moving_add(name, amount, now)
            if name.startswith("tpm:"):
                ticket.tokens_entry = entry
        if policy.max_parallel is not None:
            counters.gauge_add(parallel_name, 1)
            ticket.parallel = True
        return ticket

    def count(self, flow_id: str, client_id: int, policy: ClientPolicy, model: str | None, now: float) -> Ticket:
        """The ticket of an admitted request: its spend counts when it settles, limited client or not
        (the clients pages show every client's spend today and this month)."""
        ticket = self.tickets[flow_id] = Ticket(client_id, policy, model, now)
        return ticket

    def _holds(
        self, client_id: int, policy: ClientPolicy, model: str | None, body: bytes, path: str, now: float
    ) -> tuple[tuple[str, float], ...]:
        """What the request's budgets hold for it while it runs: (spend counter, amount)."""
        tokens = policy.daily_tokens is not None or policy.monthly_tokens is not None
        usd = policy.daily_usd is not None or policy.monthly_usd is not None
        if not (tokens or usd):
            return ()
        prompt, output = reservation(path, model, body)
        if not prompt and not output:
            return ()
        names = self.spend_names(client_id, now)
        holds = []
        if tokens:
            holds += [(names["day_tokens"], float(prompt + output)), (names["month_tokens"], float(prompt + output))]
        cost = self.prices.cost(model, prompt, output) if usd else None
        if cost:
            holds += [(names["day_usd"], cost), (names["month_usd"], cost)]
        return tuple(holds)

    def over_budget(self, client_id: int, policy: ClientPolicy, now: float) -> Refusal | None:
        """The refusal of a client whose budget is spent (a Realtime session's check as each response ends)."""
        return self._over_budget(client_id, policy, now, ())

    def _over_budget(
        self, client_id: int, policy: ClientPolicy, now: float, holds: tuple[tuple[str, float], ...]
    ) -> Refusal | None:
        names = None
        for unit, period, limit in (
            ("tokens", "day", policy.daily_tokens),
            ("tokens", "month", policy.monthly_tokens),
            ("usd", "day", policy.daily_usd),
            ("usd", "month", policy.monthly_usd),
        ):
            if limit is None:
                continue
            names = names or self.spend_names(client_id, now)
            name = names[f"{period}_{unit}"]
            spent = self.counters.period_total(name)
            held = self.reserved.get(name, 0.0)
            need = next((amount for counter, amount in holds if counter == name), 0.0)
            if spent < limit and not (held > 0 and spent + held + need > limit):
                continue
            renews = next_day(now) if period == "day" else next_month(now)
            what = f"{'daily' if period == 'day' else 'monthly'} {'token' if unit == 'tokens' else 'cost'} budget"
            if spent >= limit:
                message = (
                    f"This client's {what} of {_amount(unit, limit)} is spent ({_amount(unit, spent, 4)});"
                    f" it renews at {_iso(renews)}."
                )
            else:
                message = (
                    f"This client's {what} of {_amount(unit, limit)} has {_amount(unit, spent, 4)} spent and"
                    f" {_amount(unit, held, 4)} held by its requests in flight; this request may need"
                    f" {_amount(unit, need, 4)} more. Retry when those end; the budget renews at {_iso(renews)}."
                )
            return refused(429, "insufficient_quota", message, "insufficient_quota", {"x-should-retry": "false"})
        return None

    def _rate_limited(
        self, client_id: int, policy: ClientPolicy, name: str, limit: int, wait: float, now: float
    ) -> Refusal:
        what = {"rpm": "requests", "tpm": "tokens", "ip": "requests"}[name.split(":", 1)[0]]
        if name.startswith("ip:"):
            message = f"Rate limit reached for requests from this address: {limit} per minute across all clients."
            headers = {}
        else:
            message = f"Rate limit reached for {what} per minute: limit {limit}."
            headers = self.rate_headers(client_id, policy, now)
        message += f" Please try again in {duration(wait)}."
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        return refused(429, "rate_limit_exceeded", message, what, headers)

    def rate_headers(self, client_id: int, policy: ClientPolicy, now: float) -> dict[str, str]:
        """The client's own x-ratelimit-* (OpenAI's names), for its limits that are set."""
        headers = {}
        for kind, limit in (("requests", policy.rpm), ("tokens", policy.tpm)):
            if limit is None:
                continue
            total, oldest = self.counters.moving_total(
                f"{'rpm' if kind == 'requests' else 'tpm'}:{client_id}", MINUTE, now
            )
            reset = (oldest + MINUTE - now) if oldest is not None else 0.0
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(limit - total)))
            headers[f"x-ratelimit-reset-{kind}"] = duration(reset)
        return headers

    def settle(self, flow_id: str, usage: dict[str, Any] | None, cost: float | None, now: float) -> Ticket | None:
        """The request ended: its reported tokens replace the estimate, its spend counts, its slot frees."""
        ticket = self.tickets.pop(flow_id, None)
        if ticket is None or ticket.settled:
            return ticket
        try:
            if ticket.parallel or ticket.reservations or ticket.tokens_entry is not None or ticket.policy.has_budget:
                with self.counters.atomic():  # what admissions weigh changes: one decision
                    self._settle(ticket, usage, cost)
            else:  # spend only no admission weighs (shown on the pages): the backend may batch it
                self._settle(ticket, usage, cost)
        except CountersUnavailable as e:
            log.warning("a request of client %d ended uncounted: %s", ticket.client_id, e)
        return ticket

    def _settle(self, ticket: Ticket, usage: dict[str, Any] | None, cost: float | None) -> None:
        ticket.settled = True
        counters = self.counters
        if ticket.parallel:
            counters.gauge_add(f"parallel:{ticket.client_id}", -1)
        self._release(ticket.reservations)
        tokens = _tokens_of(usage)
        if tokens is not None and ticket.tokens_entry is not None:
            counters.moving_adjust(f"tpm:{ticket.client_id}", ticket.tokens_entry, tokens)
        # Spend counts in the period the request started in, as a bill would.
        names = None
        for unit, amount in (("tokens", tokens), ("usd", cost)):
            if not amount:
                continue
            names = names or self.spend_names(ticket.client_id, ticket.admitted_at)
            for period in ("day", "month"):
                counters.period_add(names[f"{period}_{unit}"], amount)

    def _release(self, holds: tuple[tuple[str, float], ...]) -> None:
        reserved = self.reserved
        for name, amount in holds:
            left = reserved.get(name, 0.0) - amount
            if left > 1e-9:
                reserved[name] = left
            else:
                reserved.pop(name, None)  # nothing in flight: also drops float dust

    def charge(self, client_id: int, usage: dict[str, Any] | None, cost: float | None, now: float) -> None:
        """Spend without a ticket: one response of a Realtime session, as it ends."""
        names = self.spend_names(client_id, now)
        try:
            with self.counters.atomic():
                for unit, amount in (("tokens", _tokens_of(usage)), ("usd", cost)):
                    if amount:
                        for period in ("day", "month"):
                            self.counters.period_add(names[f"{period}_{unit}"], amount)
        except CountersUnavailable as e:
            log.warning("a Realtime response of client %d ended uncounted: %s", client_id, e)


def _amount(unit: str, value: float, places: int | None = None) -> str:
    if unit == "tokens":
        return f"{value:g} tokens"
    return f"${value:.{places}f}" if places is not None else f"${value:g}"


def _tokens_of(usage: dict[str, Any] | None) -> int | None:
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool):
        return total
    parts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")]
    numbers = [p for p in parts if isinstance(p, int) and not isinstance(p, bool)]
    return sum(numbers) if numbers else None


def limits_shown(policy: ClientPolicy) -> dict[str, Any]:
    """The limits that are set, as a person reads them (lists joined, expiry in ISO form)."""
    shown: dict[str, Any] = {}
    for name in LIMIT_FIELDS:
        value = getattr(policy, name)
        if value in (None, ()):
            continue
        if name in LIST_FIELDS:
            value = ",".join(value)
        elif name == "expires_at":
            name, value = "expires", _iso(value)
        shown[name] = value
    return shown


def spend_names(client_id: int, now: float) -> dict[str, str]:
    """The counters of a client's spend this day and month: day_tokens, day_usd, month_tokens, month_usd."""
    return {
        f"{period}_{unit}": spend_name(client_id, unit, period, now)
        for period in ("day", "month")
        for unit in ("tokens", "usd")
    }
