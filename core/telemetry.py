"""OpenTelemetry traces of requests (docs/otel.md): W3C trace context, span ids, what each span says.

A request is one span (the gateway's, kind SERVER), each upstream attempt a child span (kind
CLIENT), with the GenAI semantic conventions' attributes and keyrotor's own. The ids are chosen
here as the request goes: the request span continues the client's `traceparent` (a new trace
when it sent none or a malformed one), and each attempt's `traceparent` upstream names that
attempt's span, retries included (core/failover.py asks `attempt_fields`). When the request
ends, `spans` turns what the flow recorded (core/records.py AttemptLog: when, which key, which
status) into plain span plans; addons/otel.py hands them to the OpenTelemetry SDK.

Nothing here may carry a key value: keys are named by id, errors by code, never by their text.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from core.bodies import event_usage, json_object
from core.metadata import Metadata
from core.records import AttemptLog
from core.routing import Dialect
from core.spent import json_usage

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
MAX_TRACESTATE = 512  # W3C: 32 list members of at most 256 characters; longer is dropped, not cut
_HEX = frozenset("0123456789abcdef")
_WORD = re.compile(r"v[0-9]+|[a-z_]+")  # a path's words; anything else (ids, deployments) is {id}
_decoder = json.JSONDecoder()

# gen_ai.operation.name by the end of the request's path (the GenAI conventions' well-known values).
OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/responses", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
)
# gen_ai.provider.name (and the older gen_ai.system) by the upstream's dialect.
PROVIDERS = {Dialect.OPENAI: "openai", Dialect.AZURE: "azure.ai.openai"}
MODEL_HEAD_BYTES = 1024  # an answer names its model near its start (chat, responses) ...
MODEL_TAIL_BYTES = 4096  # ... or near its end, before its usage (embeddings)


@dataclass(frozen=True)
class TraceParent:
    """A W3C traceparent header's fields (version 00)."""

    trace_id: str  # 32 lower-case hex digits
    span_id: str  # 16
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    def header(self) -> bytes:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}".encode()


def parse_traceparent(value: str | None) -> TraceParent | None:
    """The client's traceparent, None when it is absent or malformed (W3C Trace Context, level 1)."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or not _is_hex(parts[0]) or parts[0] == "ff":
        return None
    version, trace_id, span_id, flags = parts[0], parts[1], parts[2], parts[3]
    if version == "00" and len(parts) != 4:
        return None
    if len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2:
        return None
    if not (_is_hex(trace_id) and _is_hex(span_id) and _is_hex(flags)):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return TraceParent(trace_id, span_id, int(flags, 16) & 0xFF)


def _is_hex(text: str) -> bool:
    return bool(text) and set(text) <= _HEX


def new_trace_id() -> str:
    return f"{random.getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


@dataclass
class FlowTrace(Metadata):
    """One request's place in its trace: its span, and the client's span it continues (if any)."""

    trace_id: str = ""
    span_id: str = ""  # the request span's
    parent_id: str | None = None  # the client's span, from its traceparent
    flags: int = 1  # the client's trace flags (sampled unless its traceparent said otherwise)
    tracestate: str | None = None  # the client's, passed on as it came

    KEY = "keyrotor.otel"

    @classmethod
    def begin(cls, traceparent: str | None, tracestate: str | None) -> FlowTrace:
        """The trace of a request that arrived with these headers."""
        parent = parse_traceparent(traceparent)
        state = tracestate.strip() if parent is not None and tracestate else None
        if state is not None and len(state) > MAX_TRACESTATE:
            state = None
        if parent is None:
            return cls(new_trace_id(), new_span_id())
        return cls(parent.trace_id, new_span_id(), parent.span_id, parent.flags, state)

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    def traceparent(self, span_id: str) -> bytes:
        """The header upstream gets for the attempt whose span is `span_id`."""
        return TraceParent(self.trace_id, span_id, self.flags).header()


def header_values(fields: Iterable[tuple[bytes, bytes]], *names: bytes) -> list[str | None]:
    """The first value of each of `names` (lower case) among `fields`, read in one pass."""
    found: list[str | None] = [None] * len(names)
    for name, value in fields:
        lowered = name.lower()
        if lowered in names:
            at = names.index(lowered)
            if found[at] is None:
                found[at] = value.decode("latin-1")
    return found


def with_traceparent(fields: Iterable[tuple[bytes, bytes]], value: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """`fields` with `value` as their one traceparent (the client's, if any, replaced)."""
    kept = tuple((n, v) for n, v in fields if n.lower() != TRACEPARENT)
    return (*kept, (TRACEPARENT, value))


def attempt_fields(fields: list[tuple[bytes, bytes]], attempt: AttemptLog) -> list[tuple[bytes, bytes]]:
    """A retry's headers: the traceparent the first attempt carried, naming `attempt`'s own new span."""
    for name, value in fields:
        if name.lower() == TRACEPARENT:
            parent = parse_traceparent(value.decode("latin-1"))
            if parent is None:
                return fields
            attempt.span_id = new_span_id()
            sent = TraceParent(parent.trace_id, attempt.span_id, parent.flags).header()
            return list(with_traceparent(fields, sent))
    return fields


def traces_url(endpoint: str) -> str:
    """Where spans are posted: a collector's base URL gets OTLP/HTTP's /v1/traces; a URL with a path is kept."""
    scheme, _, rest = endpoint.partition("://")
    if "/" not in rest or rest.endswith("/") and rest.count("/") == 1:
        return f"{scheme}://{rest.rstrip('/')}/v1/traces"
    return endpoint


def shown_url(url: str) -> str:
    """`url` as a log line may show it: without a user or password in it."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def collector_headers(text: str) -> dict[str, str]:
    """The otel.headers setting ("name=value,...", values %-encoded) as the exporter's headers."""
    headers = {}
    for pair in text.split(","):
        name, _, value = pair.partition("=")
        if name.strip():
            headers[name.strip().lower()] = unquote(value.strip())
    return headers


# --------------------------------------------------------------------------- what the answer said


def operation_of(path: str) -> str | None:
    """gen_ai.operation.name of a request to `path` (query ignored), None for other endpoints."""
    route = path.partition("?")[0].rstrip("/")
    for suffix, operation in OPERATIONS:
        if route.endswith(suffix):
            return operation
    return None


def answer_of_body(body: bytes, event_stream: bool) -> tuple[str | None, dict[str, Any] | None]:
    """(model, usage) a whole answer names: a JSON body's top-level ones, or a stream's last events."""
    if event_stream:
        return answer_of_events(body[-16384:])
    usage = json_usage(body)
    at = body.find(b'"model"', 0, MODEL_HEAD_BYTES)
    if at < 0:
        at = body.rfind(b'"model"', max(0, len(body) - MODEL_TAIL_BYTES))
    return (_string_after(body, at) if at >= 0 else None), usage


def answer_of_events(tail: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """(model, usage) from the last events of a stream (`tail`: its last reads)."""
    model: str | None = None
    for line in reversed(tail.split(b"\n")):
        if not line.startswith(b"data:") or (b'"usage"' not in line and (model or b'"model"' not in line)):
            continue
        event = json_object(line[5:].strip())
        if not event:
            continue
        named = event.get("model")
        inner = event.get("response")
        if named is None and isinstance(inner, dict):  # the Responses API's response.completed
            named = inner.get("model")
        if model is None and isinstance(named, str):
            model = named
        usage = event_usage(event)
        if usage is not None:
            return model, usage
    return model, None


def _string_after(body: bytes, at: int) -> str | None:
    colon = body.find(b":", at + 7, at + 64)
    if colon < 0:
        return None
    try:
        value, _ = _decoder.raw_decode(body[colon + 1 : colon + 512].decode("utf-8", "replace").lstrip())
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def tokens(usage: Mapping[str, Any] | None) -> tuple[int | None, int | None]:
    """(input, output) tokens of a usage object: chat's prompt/completion or the Responses API's input/output."""
    if not usage:
        return None, None
    given = usage.get("prompt_tokens", usage.get("input_tokens"))
    made = usage.get("completion_tokens", usage.get("output_tokens"))
    return (given if isinstance(given, int) else None), (made if isinstance(made, int) else None)


# --------------------------------------------------------------------------- spans


@dataclass(frozen=True)
class GroupInfo:
    """What a span says of the group an attempt went to (core.routing.Group)."""

    label: str  # UPSTREAM/GROUP
    upstream: str
    dialect: Dialect


@dataclass
class Finished:
    """A request as it ended: what its spans say (keys by id only)."""

    flow_id: str
    method: str
    path: str  # as the client sent it
    started_at: float
    ended_at: float
    status: int | None  # what the client got (None: nothing)
    error_code: str | None = None  # keyrotor's own error code, or why the exchange did not complete
    broken: bool = False  # it did not complete: the client left, upstream failed, the proxy stopped
    client_id: int | None = None
    client_name: str | None = None
    client_key_id: int | None = None
    model: str | None = None  # as the client asked for it
    fallback_model: str | None = None
    response_model: str | None = None
    usage: Mapping[str, Any] | None = None
    stream: bool = False
    attempts: list[AttemptLog] = field(default_factory=list)


@dataclass
class SpanPlan:
    """One span, as the SDK is to record it."""

    name: str
    span_id: str
    parent_id: str | None  # None: a root span
    server: bool  # kind SERVER (the request); else CLIENT (an attempt upstream)
    start: float
    end: float
    attributes: dict[str, str | int | bool]
    error: str | None = None  # the span's status: ERROR with this description; None: unset


def spans(done: Finished, trace: FlowTrace, groups: Mapping[int, GroupInfo]) -> list[SpanPlan]:
    """The request's span, then one per attempt upstream that has a span id."""
    operation = operation_of(done.path)
    request_model = done.model
    name = f"{operation} {request_model}" if operation and request_model else f"{done.method} {_route(done.path)}"
    last = done.attempts[-1] if done.attempts else None
    group = groups.get(last.group_id) if last is not None and last.group_id is not None else None
    attributes: dict[str, str | int | bool] = {
        "http.request.method": done.method,
        "http.route": _route(done.path),
        "keyrotor.flow_id": done.flow_id,
        "keyrotor.attempts": len(done.attempts),
        "keyrotor.stream": done.stream,
    }
    _put(attributes, "http.response.status_code", done.status)
    _put(attributes, "gen_ai.operation.name", operation)
    _put(attributes, "gen_ai.request.model", request_model)
    _put(attributes, "gen_ai.response.model", done.response_model)
    given, made = tokens(done.usage)
    _put(attributes, "gen_ai.usage.input_tokens", given)
    _put(attributes, "gen_ai.usage.output_tokens", made)
    if group is not None and last is not None:
        _put_group(attributes, group, last)
    _put(attributes, "keyrotor.client.id", done.client_id)
    _put(attributes, "keyrotor.client.name", done.client_name)
    _put(attributes, "keyrotor.client_key.id", done.client_key_id)
    _put(attributes, "keyrotor.fallback_model", done.fallback_model)
    # The gateway's span fails as an HTTP server's does: on a 5xx, or when the exchange did not complete.
    failed = done.broken or done.status is None or done.status >= 500
    if failed or done.error_code or (done.status is not None and done.status >= 400):
        attributes["error.type"] = done.error_code or (str(done.status) if done.status else "no_answer")
    _put(attributes, "keyrotor.error_code", done.error_code)
    error = str(attributes["error.type"]) if failed else None
    plans = [SpanPlan(name, trace.span_id, trace.parent_id, True, done.started_at, done.ended_at, attributes, error)]
    for attempt in done.attempts:
        if attempt.span_id is None:
            continue
        plans.append(_attempt_span(done, attempt, attempt is last, trace, groups, operation))
    return plans


def _attempt_span(
    done: Finished,
    attempt: AttemptLog,
    answered: bool,
    trace: FlowTrace,
    groups: Mapping[int, GroupInfo],
    operation: str | None,
) -> SpanPlan:
    model = attempt.model or done.model
    group = groups.get(attempt.group_id) if attempt.group_id is not None else None
    attributes: dict[str, str | int | bool] = {
        "keyrotor.flow_id": done.flow_id,
        "keyrotor.attempt": attempt.attempt,
        "keyrotor.key.id": attempt.key_id,
    }
    _put(attributes, "gen_ai.operation.name", operation)
    _put(attributes, "gen_ai.request.model", model)
    if group is not None:
        _put_group(attributes, group, attempt)
    _put(attributes, "http.response.status_code", attempt.status)
    end = attempt.started_at + (attempt.duration_ms or 0) / 1000
    if answered:  # the answer the client got came through this attempt, to its end
        _put(attributes, "gen_ai.response.model", done.response_model)
        given, made = tokens(done.usage)
        _put(attributes, "gen_ai.usage.input_tokens", given)
        _put(attributes, "gen_ai.usage.output_tokens", made)
        end = max(end, done.ended_at)
    error = None
    if attempt.status is None:
        error = "timeout" if attempt.error and "timed out" in attempt.error.lower() else "connection_error"
        if attempt.error is None and answered:
            error = done.error_code or "no_answer"
    elif attempt.status >= 400:
        error = str(attempt.status)
    _put(attributes, "error.type", error)
    name = f"{operation} {model}" if operation and model else f"{done.method} {_route(done.path)}"
    return SpanPlan(name, attempt.span_id or "", trace.span_id, False, attempt.started_at, end, attributes, error)


def _put_group(attributes: dict[str, str | int | bool], group: GroupInfo, attempt: AttemptLog) -> None:
    provider = PROVIDERS.get(group.dialect, "openai")
    attributes["gen_ai.provider.name"] = provider
    attributes["gen_ai.system"] = provider
    attributes["keyrotor.group.name"] = group.label
    attributes["keyrotor.upstream.name"] = group.upstream
    _put(attributes, "keyrotor.group.id", attempt.group_id)
    _put(attributes, "keyrotor.upstream.id", attempt.upstream_id)
    attributes["keyrotor.key.id"] = attempt.key_id


def _put(attributes: dict[str, str | int | bool], name: str, value: str | int | bool | None) -> None:
    if value is not None:
        attributes[name] = value


def _route(path: str) -> str:
    """The client's path without its query, object ids as {id}: a span name of few distinct values."""
    kept = []
    for part in path.partition("?")[0].split("/"):
        word = not part or _WORD.fullmatch(part) is not None
        kept.append(part if word else "{id}")
    return "/".join(kept)
