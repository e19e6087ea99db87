"""One captured flow: the snapshot taken on the event loop and the typed record storage keeps.

Hooks only copy cheap references into a `CapturedFlow`; decoding, JSON parsing and
truncation happen in `to_record()`, which the writer thread calls, never the event loop.
`FlowRecord` is what crosses into storage: storage/flows.py alone maps it to columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from core.bodies import decoded, json_object, sse_usage, stored_body
from core.prices import PriceTable

REDACTED_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie", "set-cookie"})
REDACTED = "[redacted]"

HeaderFields = tuple[tuple[bytes, bytes], ...]


@dataclass
class AttemptLog:
    """One try of a request upstream, with the key it used."""

    attempt: int  # 1 for the first try
    key_id: int
    started_at: float
    status: int | None = None  # None: no answer (connection error, timeout)
    error: str | None = None
    duration_ms: float | None = None
    upstream_id: int | None = None
    group_id: int | None = None
    model: str | None = None  # the model this attempt asked for, when a fallback of the flow's


@dataclass
class FlowRecord:
    """A flow as storage keeps it; every field but the first four is optional."""

    flow_id: str  # mitmproxy's flow id, to find the same flow in mitmweb
    started_at: float
    method: str
    path: str
    first_byte_at: float | None = None
    ended_at: float | None = None
    duration_ms: float | None = None
    status: int | None = None
    model: str | None = None
    stream: bool = False
    client_key_id: int | None = None
    upstream_key_id: int | None = None
    upstream_id: int | None = None
    group_id: int | None = None
    fallback_model: str | None = None  # the model that answered instead of the one asked for
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost: float | None = None
    client_addr: str | None = None
    error: str | None = None
    client_id: int | None = None  # the client that owns client_key_id
    refusal: str | None = None  # the error code keyrotor refused the request with (model_not_allowed, …)
    request_headers: list[list[str]] = field(default_factory=list)  # [name, value], secrets redacted
    response_headers: list[list[str]] = field(default_factory=list)
    request_body: str | None = None
    request_body_size: int = 0
    request_body_truncated: bool = False
    response_body: str | None = None
    response_body_size: int = 0
    response_body_truncated: bool = False
    chunk_times: list[list[float]] | None = None  # [[ms since first byte, bytes], ...] of a stream
    # Only retried flows keep their attempts: a single attempt is the flow itself.
    attempt_log: list[AttemptLog] = field(default_factory=list)

    @property
    def is_error(self) -> bool:
        return self.status is None or self.status >= 400 or bool(self.error)


@dataclass
class StreamTee:
    """Passes each read of a streamed body straight on, keeping a copy and its arrival time.

    When another addon already set a stream callable (`inner`), the copy is of what upstream
    sent and the client gets what `inner` makes of it: bytes or an iterable of bytes.
    """

    first_byte: float
    inner: Callable[[bytes], bytes | Iterable[bytes]] | None = None
    chunks: list[bytes] = field(default_factory=list)
    times: list[tuple[float, int]] = field(default_factory=list)
    ended_at: float | None = None

    def __call__(self, data: bytes) -> bytes | Iterable[bytes]:
        now = time.time()
        if data:
            self.chunks.append(data)
            self.times.append((now, len(data)))
        else:
            self.ended_at = now
        return data if self.inner is None else self.inner(data)


def redact(fields: HeaderFields) -> list[list[str]]:
    rows = []
    for raw_name, raw_value in fields:
        name = raw_name.decode("latin-1")
        rows.append([name, REDACTED if name.lower() in REDACTED_HEADERS else raw_value.decode("latin-1")])
    return rows


@dataclass
class CapturedFlow:
    """Everything a record needs, copied from the flow on the event loop (cheap references only)."""

    flow_id: str
    started_at: float
    method: str
    path: str
    client_addr: str | None
    request_fields: HeaderFields
    request_body: bytes | None
    request_encoding: str | None
    client_key_id: int | None
    upstream_key_id: int | None
    body_mode: str
    max_body_bytes: int
    status: int | None = None
    first_byte_at: float | None = None
    ended_at: float | None = None
    response_fields: HeaderFields = ()
    response_body: bytes | None = None
    response_chunks: list[bytes] | None = None  # a streamed body, joined in the writer thread
    response_encoding: str | None = None
    is_sse: bool = False
    chunk_times: list[tuple[float, int]] | None = None
    error: str | None = None
    attempts: list[AttemptLog] = field(default_factory=list)  # the key pool's, one per upstream try
    upstream_id: int | None = None
    group_id: int | None = None
    fallback_model: str | None = None
    requested_model: str | None = None  # when routing renamed the body's model, what the client asked for
    client_id: int | None = None
    refusal: str | None = None
    prices: PriceTable = field(default_factory=PriceTable)  # shared by every flow, loaded once in configure

    def to_record(self) -> FlowRecord:
        request_body = decoded(self.request_body, self.request_encoding)
        raw_response = b"".join(self.response_chunks) if self.response_chunks is not None else self.response_body
        response_body = decoded(raw_response, self.response_encoding)
        # Parse only bodies that can hold what the record needs (a substring test is far cheaper).
        request_json = (json_object(request_body) if b'"model"' in request_body else None) or {}
        if self.is_sse:
            usage = sse_usage(response_body)
        else:
            usage = (json_object(response_body) or {}).get("usage") if b'"usage"' in response_body else None
        usage = usage if isinstance(usage, dict) else {}
        stored_request, request_cut = stored_body(request_body, self.body_mode, self.max_body_bytes)
        stored_response, response_cut = stored_body(response_body, self.body_mode, self.max_body_bytes)
        model = self.requested_model or request_json.get("model")
        model = model if isinstance(model, str) else None
        ended = self.ended_at or time.time()
        first = self.first_byte_at
        return FlowRecord(
            flow_id=self.flow_id,
            started_at=self.started_at,
            method=self.method,
            path=self.path,
            first_byte_at=first,
            ended_at=ended,
            duration_ms=round((ended - self.started_at) * 1000, 3),
            status=self.status,
            model=model,
            stream=self.is_sse or request_json.get("stream") is True,
            client_key_id=self.client_key_id,
            upstream_key_id=self.upstream_key_id,
            upstream_id=self.upstream_id,
            group_id=self.group_id,
            fallback_model=self.fallback_model,
            attempts=len(self.attempts) or int(self.upstream_key_id is not None),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            total_tokens=usage.get("total_tokens"),
            cost=self.prices.cost(
                self.fallback_model or model, usage.get("prompt_tokens"), usage.get("completion_tokens")
            ),
            client_addr=self.client_addr,
            error=self.error,
            client_id=self.client_id,
            refusal=self.refusal or _keyrotor_error(self.response_fields),
            request_headers=redact(self.request_fields),
            response_headers=redact(self.response_fields),
            request_body=stored_request,
            request_body_size=len(request_body),
            request_body_truncated=request_cut,
            response_body=stored_response,
            response_body_size=len(response_body),
            response_body_truncated=response_cut,
            chunk_times=[[round((t - (first or t)) * 1000, 1), n] for t, n in self.chunk_times]
            if self.chunk_times
            else None,
            attempt_log=self.attempts if len(self.attempts) > 1 else [],
        )


def _keyrotor_error(fields: HeaderFields) -> str | None:
    """The code of an answer keyrotor made itself (413, 404 model, 503 no key): core/errors.py sets the header."""
    for name, value in fields:
        if name.lower() == b"x-keyrotor-error":
            return value.decode("latin-1") or None
    return None
