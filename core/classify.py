"""What an upstream answer says about the key that was used: pure functions, no proxy needed.

`headers` is anything with a case-insensitive `.get` (mitmproxy's or httpx's Headers), so
the proxy's answers, retries and probes are all classified the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Protocol, overload


class OutcomeKind(StrEnum):
    OK = "ok"
    INVALID = "invalid"  # 401 / 403
    EXHAUSTED = "exhausted"  # 429 insufficient_quota
    RATE_LIMITED = "rate_limited"  # any other 429
    SERVER_ERROR = "server_error"  # 5xx
    CONNECTION_ERROR = "connection_error"  # no usable answer at all


# Outcomes that mean "this key, not the request, is the problem": another key may succeed.
KEY_FAILURES = frozenset(
    {
        OutcomeKind.INVALID,
        OutcomeKind.EXHAUSTED,
        OutcomeKind.RATE_LIMITED,
        OutcomeKind.SERVER_ERROR,
        OutcomeKind.CONNECTION_ERROR,
    }
)
# Failures that are about our key alone: the client must not see upstream's words for them.
KEY_ONLY_FAILURES = frozenset({OutcomeKind.INVALID, OutcomeKind.EXHAUSTED, OutcomeKind.RATE_LIMITED})
# Failures that may be the key's, the request's or upstream's: only comparing keys tells.
UPSTREAM_TROUBLE = frozenset({OutcomeKind.SERVER_ERROR, OutcomeKind.CONNECTION_ERROR})
QUOTA_CODES = frozenset({"insufficient_quota", "insufficientquota", "quota_exceeded"})
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class HeaderLookup(Protocol):
    """Read access to an answer's headers. Positional and overloaded like `Mapping.get`, so that
    mitmproxy's and httpx's Headers (and a dict, in tests) satisfy it as they are."""

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, default: str, /) -> str: ...


@dataclass(frozen=True)
class Outcome:
    """One attempt's result, as far as the key is concerned."""

    kind: OutcomeKind
    reason: str | None = None
    wait: float | None = None  # seconds upstream asked us to wait (rate limits only)

    @property
    def is_key_failure(self) -> bool:
        return self.kind in KEY_FAILURES


OK = Outcome(OutcomeKind.OK)


def parse_duration(text: str | None) -> float | None:
    """OpenAI's x-ratelimit-reset-* durations: "6m0s", "1.5s", "20ms", "1h2m3s"; a bare number is seconds."""
    if not text:
        return None
    text = text.strip().lower()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def retry_after_seconds(headers: HeaderLookup, now: float) -> float | None:
    """retry-after-ms, else Retry-After as delta-seconds or an HTTP date."""
    millis = (headers.get("retry-after-ms") or "").strip()
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError):
        return None


def ratelimit_reset_seconds(headers: HeaderLookup) -> float | None:
    """When the exhausted limit resets: the one whose x-ratelimit-remaining-* is 0, else the later one."""
    resets = {kind: parse_duration(headers.get(f"x-ratelimit-reset-{kind}")) for kind in ("requests", "tokens")}
    spent = [
        reset
        for kind, reset in resets.items()
        if reset is not None and (headers.get(f"x-ratelimit-remaining-{kind}") or "").strip() == "0"
    ]
    known = spent or [v for v in resets.values() if v is not None]
    return max(known) if known else None


def error_fields(content: bytes | None) -> tuple[str | None, str]:
    """(`error.code` or `error.type`, `error.message`) of an OpenAI- or Azure-shaped error body."""
    try:
        error = json.loads(content or b"")["error"]
        code = error.get("code") or error.get("type")
        return (str(code) if code is not None else None), str(error.get("message") or "")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, ""


def classify_response(status: int, headers: HeaderLookup, content: bytes | None, now: float) -> Outcome | None:
    """The outcome of an answer, or None when it is the request's own fault (400, 404, 422…): no retry."""
    if 200 <= status < 300 or status == 101:  # 101: a WebSocket session (Realtime) accepted
        return OK
    if status in (401, 403):
        code, _ = error_fields(content)
        return Outcome(OutcomeKind.INVALID, f"{status} {code or 'unauthorized'}")
    if status == 429:
        code, message = error_fields(content)
        if (code or "").lower() in QUOTA_CODES or "exceeded your current quota" in message.lower():
            return Outcome(OutcomeKind.EXHAUSTED, "429 insufficient_quota")
        if is_request_too_large(message):
            return None  # the request asks more than the limit allows on any key: the client's to fix
        wait = retry_after_seconds(headers, now)
        if wait is None:
            wait = ratelimit_reset_seconds(headers)
        return Outcome(OutcomeKind.RATE_LIMITED, f"429 {code or 'rate_limit_exceeded'}", wait)
    if status >= 500:
        code, _ = error_fields(content)
        return Outcome(OutcomeKind.SERVER_ERROR, f"{status} {code or 'server_error'}")
    return None


_LIMIT_REQUESTED = re.compile(r"limit (\d+), requested (\d+)")


def is_request_too_large(message: str) -> bool:
    """OpenAI's 429 for a request bigger than the whole per-minute limit ("Request too large …
    Limit 30000, Requested 45000. The input or output tokens must be reduced …"): waiting or
    another key cannot help, unlike "Rate limit reached … Limit 30000, Used 25000, Requested 8000"."""
    lower = message.lower()
    if "request too large" in lower or "must be reduced" in lower:
        return True
    match = _LIMIT_REQUESTED.search(lower)
    return match is not None and int(match.group(2)) > int(match.group(1))


def is_client_side(error_message: str) -> bool:
    """mitmproxy's error for a flow whose client went away (not upstream's fault, not the key's)."""
    # mitmproxy words the client's hang-ups "Client disconnected." / "client closed …".
    return "client" in error_message.lower()


TIMED_OUT = "upstream timed out"  # addons/upstream_watch.py's words for a silent attempt


def is_timeout(message: str) -> bool:
    """An attempt upstream left silent (no headers, no first byte) past its limit."""
    return message.startswith(TIMED_OUT)


def connection_failure(message: str) -> Outcome:
    """No usable answer at all: refused, reset, closed early, timed out."""
    return Outcome(OutcomeKind.CONNECTION_ERROR, message[:200])


CONTEXT_TOO_LONG_CODES = frozenset({"context_length_exceeded"})


def is_context_too_long(status: int, content: bytes | None) -> bool:
    """Upstream's 400 for a prompt longer than the model's context (OpenAI's and Azure's
    `context_length_exceeded`; a relay that drops the code still says "maximum context length").

    The request's fault on this model, on any key: a model with a longer context may take it.
    """
    if status != 400:
        return False
    code, message = error_fields(content)
    return (code or "").lower() in CONTEXT_TOO_LONG_CODES or "maximum context length" in message.lower()


MODEL_MISSING_CODES = frozenset({"model_not_found", "deploymentnotfound"})


def is_model_missing(status: int, content: bytes | None) -> bool:
    """Upstream says it has no such model (OpenAI's model_not_found, Azure's DeploymentNotFound).

    Not the key's fault and not the request's: another group may serve the model.
    """
    if status != 404:
        return False
    code, message = error_fields(content)
    return (code or "").lower() in MODEL_MISSING_CODES or "does not exist" in message.lower()


def is_deployment_missing(status: int, content: bytes | None) -> bool:
    """Azure says the deployment does not exist: true of the resource, whichever key asks (OpenAI's
    model_not_found can mean one key's project has no access, so it says nothing of the group)."""
    return status == 404 and (error_fields(content)[0] or "").lower() == "deploymentnotfound"
