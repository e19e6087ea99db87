"""One captured flow: the snapshot taken on the event loop and the typed record storage keeps.

Hooks only copy cheap references into a `CapturedFlow`; decoding, JSON parsing and
truncation happen in `to_record()`, which the writer thread calls, never the event loop.
`FlowRecord` is what crosses into storage: storage/flows.py alone maps it to columns.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from core.bodies import (
    decoded,
    event_usage,
    form_parts,
    form_summary,
    is_text,
    json_object,
    kept_bytes,
    sse_usage,
    stored_body,
)
from core.metering import IMAGES, NO_USAGE, request_usage, summed, usage_of
from core.previews import answer_preview, prompt_preview, stream_answer_preview
from core.prices import PriceTable
from core.rewrites import client_request, recorded_differences
from core.routing import query_model, requested_model

REDACTED_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie", "set-cookie", "x-keyrotor-pass"}
)
REDACTED = "[redacted]"

HeaderFields = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class Retention:
    """Which captured flows are deleted as new ones arrive (the capture.keep_days, max_rows and max_gb settings)."""

    keep_days: float = 0  # 0: no age limit
    max_rows: int = 0  # 0: no row limit
    max_bytes: int = 0  # 0: no size limit; else the oldest flows go while the database uses more


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
    url: str | None = None  # where it went upstream (an Azure deployment path, a relay's prefix)
    span_id: str | None = None  # its OpenTelemetry span, named in its traceparent (core/telemetry.py); None: off


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
    cached_tokens: int | None = None  # of the prompt tokens, read from cache
    reasoning_tokens: int | None = None  # of the completion tokens
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
    # A body that is not text (audio, images, an upload's file) is kept as bytes with its type;
    # its text column then holds nothing (a response) or the form's fields (a multipart upload).
    request_body_type: str | None = None
    request_body_bytes: bytes | None = None
    response_body_type: str | None = None
    response_body_bytes: bytes | None = None
    # A WebSocket session's messages: [[ms since start, "client"|"server", "text"|"binary", bytes, text], ...]
    websocket_messages: list[list[float | str | None]] | None = None
    replay_of: int | None = None  # the flow (row id) the monitor UI sent again as this one
    pin_note: str | None = None  # where the admin pinned it (a group, a key) and what became of that
    # What the client sent where keyrotor changed it on the way (core/rewrites.py): the recorded
    # request is the one sent upstream; this says how the client's differed.
    client_request: dict[str, Any] | None = None
    worker: int | None = None  # which worker of `run.py proxy --workers N` served it (None: one process)
    # The client's labels (x-keyrotor-tags, comma-separated; x-keyrotor-session) and short previews of
    # the prompt's last user message and of the answer (core/previews.py): plain columns the list reads.
    tags: str | None = None
    session: str | None = None
    prompt_preview: str | None = None
    answer_preview: str | None = None
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


@dataclass(frozen=True)
class WebSocketMessage:
    """One message of a WebSocket session, as mitmproxy assembled it (cheap references only)."""

    at: float
    from_client: bool
    is_text: bool
    content: bytes


def header(fields: HeaderFields, name: bytes) -> str:
    for raw_name, value in fields:
        if raw_name.lower() == name:
            return value.decode("latin-1")
    return ""


# A JSON answer's base64 payloads (generated images) are not kept as text: one is kept as bytes.
B64_FIELD = "b64_json"
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


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
    websocket_messages: list[WebSocketMessage] | None = None  # a WebSocket session's, in order
    client_id: int | None = None
    refusal: str | None = None
    counted_usage: dict[str, int] | None = None  # keyrotor's count of a stream that ended without upstream's
    replay_of: int | None = None
    pin_note: str | None = None
    # The client's request (core/metadata.py ClientSent) and where the sent one went, for client_request.
    client_path: str | None = None
    client_fields: HeaderFields = ()
    client_body: bytes | None = None
    sent_url: str | None = None
    upstream_body: bytes | None = None  # the body as sent, where the record keeps the client's model name instead
    tags: str | None = None  # core/tags.py Labels.tags_text
    session: str | None = None
    prices: PriceTable = field(default_factory=PriceTable)  # shared by every flow, loaded once in configure

    def to_record(self) -> FlowRecord:
        request_body = decoded(self.request_body, self.request_encoding)
        raw_response = b"".join(self.response_chunks) if self.response_chunks is not None else self.response_body
        response_body = decoded(raw_response, self.response_encoding)
        request_type = header(self.request_fields, b"content-type")
        response_type = header(self.response_fields, b"content-type")
        request = _Body.of(request_body, request_type, self.body_mode, self.max_body_bytes)
        response = _Body.of(response_body, response_type, self.body_mode, self.max_body_bytes)
        model = self.requested_model or request.model or query_model(self.path)
        if self.is_sse:
            usage = usage_of(sse_usage(response_body))
            if self.counted_usage is not None and usage.total_tokens is None:
                usage = usage_of(self.counted_usage)
        elif self.websocket_messages is not None:
            usage = summed(usage_of(event_usage(e)) for e in _server_events(self.websocket_messages))
        else:
            usage = usage_of((response.json or {}).get("usage"))
        from_request = request_usage(self.path, request.fields, response.json)
        if from_request is not NO_USAGE:
            usage = usage + from_request
        if response.json is not None and self.path.partition("?")[0].endswith(IMAGES):
            response.keep_image_apart(request.fields, self.body_mode, self.max_body_bytes)
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
            stream=self.is_sse or request.fields.get("stream") is True,
            client_key_id=self.client_key_id,
            upstream_key_id=self.upstream_key_id,
            upstream_id=self.upstream_id,
            group_id=self.group_id,
            fallback_model=self.fallback_model,
            attempts=len(self.attempts) or int(self.upstream_key_id is not None),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cost=self.prices.cost_of(self.fallback_model or model, usage),
            client_addr=self.client_addr,
            error=self.error,
            client_id=self.client_id,
            refusal=self.refusal or _keyrotor_error(self.response_fields),
            request_headers=redact(self.request_fields),
            response_headers=redact(self.response_fields),
            request_body=request.text,
            request_body_size=len(request_body),
            request_body_truncated=request.truncated,
            response_body=response.text,
            response_body_size=len(response_body),
            response_body_truncated=response.truncated,
            chunk_times=[[round((t - (first or t)) * 1000, 1), n] for t, n in self.chunk_times]
            if self.chunk_times
            else None,
            request_body_type=request.binary_type,
            request_body_bytes=request.binary,
            response_body_type=response.binary_type,
            response_body_bytes=response.binary,
            websocket_messages=self._messages() if self.websocket_messages is not None else None,
            tags=self.tags,
            session=self.session,
            prompt_preview=prompt_preview(request.fields) if self.body_mode != "none" else None,
            answer_preview=self._answer_preview(response, response_body) if self.body_mode != "none" else None,
            attempt_log=self.attempts if len(self.attempts) > 1 else [],
            replay_of=self.replay_of,
            pin_note=self.pin_note,
            client_request=self._client_request(),
        )

    def _client_request(self) -> dict[str, Any] | None:
        if self.client_path is None or self.sent_url is None:
            return None  # refused, or answered by keyrotor: nothing went upstream
        upstream = self.upstream_body if self.upstream_body is not None else self.request_body
        same = self.client_body is upstream  # most requests: keyrotor changed nothing in the body
        encoding = header(self.client_fields, b"content-encoding") or None
        client_body = None if same or self.client_body is None else decoded(self.client_body, encoding)
        sent_body = None if same or upstream is None else decoded(upstream, self.request_encoding)
        kept = client_request(
            self.client_path,
            self.client_fields,
            client_body,
            self.path,
            self.sent_url,
            self.request_fields,
            sent_body,
        )
        if self.upstream_body is not None and sent_body is not None:
            recorded = decoded(self.request_body, self.request_encoding) if self.request_body is not None else None
            shown = recorded_differences(recorded, sent_body)
            if shown:
                kept["sent_body"] = shown  # what upstream got where the record shows the client's (a model's name)
        return kept

    def _answer_preview(self, response: _Body, raw: bytes | None) -> str | None:
        if self.is_sse:
            return stream_answer_preview(raw or b"")
        return answer_preview(response.json) if response.json is not None else None

    def _messages(self) -> list[list[float | str | None]]:
        rows: list[list[float | str | None]] = []
        for m in self.websocket_messages or ():
            text = None
            if m.is_text:
                text, _ = stored_body(m.content, self.body_mode, self.max_body_bytes)
            rows.append(
                [
                    round((m.at - self.started_at) * 1000, 1),
                    "client" if m.from_client else "server",
                    "text" if m.is_text else "binary",
                    len(m.content),
                    text,
                ]
            )
        return rows


def _server_events(messages: list[WebSocketMessage]) -> Iterable[dict[str, Any]]:
    """Realtime's `response.done` events: each carries one response's usage."""
    for m in messages:
        if not m.from_client and m.is_text and b'"response.done"' in m.content:
            event = json_object(m.content)
            if event and event.get("type") == "response.done":
                yield event


@dataclass
class _Body:
    """One body as a row keeps it, with what the record reads of it."""

    text: str | None
    truncated: bool
    fields: dict[str, Any]  # a JSON body's object, or a form's fields: where the model, size or input are
    json: dict[str, Any] | None = None  # a JSON body worth parsing (it has usage, or is an image answer)
    model: str | None = None
    binary: bytes | None = None
    binary_type: str | None = None

    @classmethod
    def of(cls, body: bytes, content_type: str, mode: str, limit: int) -> _Body:
        if "multipart/form-data" in content_type.lower():
            parts = form_parts(content_type, body)
            summary = form_summary(parts)
            text = None if mode == "none" else json.dumps(summary, ensure_ascii=False)
            kept = cls(text, False, summary, model=requested_model(content_type, body))
            upload = next((p for p in parts if p.is_file), None)
            if upload is not None:  # the file itself, as bytes: never as text
                kept.binary, kept.truncated = kept_bytes(upload.value, mode, limit)
                kept.binary_type = upload.content_type or "application/octet-stream"
            return kept
        if not is_text(content_type, body):
            binary, truncated = kept_bytes(body, mode, limit)
            media_type = content_type.partition(";")[0].strip() or "application/octet-stream"
            return cls(None, truncated, {}, binary=binary, binary_type=media_type)
        text, truncated = stored_body(body, mode, limit)
        # Parse only bodies that can hold what the record needs (a substring test is far cheaper).
        parsed = json_object(body) if (b'"model"' in body or b'"usage"' in body or b'"data"' in body) else None
        fields = parsed or {}
        model = fields.get("model")
        return cls(text, truncated, fields, parsed, model if isinstance(model, str) else None)

    def keep_image_apart(self, request: dict[str, Any], mode: str, limit: int) -> None:
        """An image answer's base64 images leave the text; the first is kept as bytes to download."""
        data = (self.json or {}).get("data")
        if not isinstance(data, list) or not any(isinstance(d, dict) and B64_FIELD in d for d in data):
            return
        image_format = request.get("output_format")
        first = None
        for item in data:
            if isinstance(item, dict) and isinstance(item.get(B64_FIELD), str):
                encoded = item[B64_FIELD]
                if first is None:
                    first = encoded
                item[B64_FIELD] = f"[{len(encoded) * 3 // 4} bytes of base64 image, not kept as text]"
        self.text, self.truncated = stored_body(json.dumps(self.json, ensure_ascii=False).encode(), mode, limit)
        try:
            image = base64.b64decode(first or "", validate=True)
        except ValueError:
            return
        self.binary, cut = kept_bytes(image, mode, limit)
        self.truncated = self.truncated or cut
        self.binary_type = IMAGE_TYPES.get(image_format if isinstance(image_format, str) else "png", "image/png")


def _keyrotor_error(fields: HeaderFields) -> str | None:
    """The code of an answer keyrotor made itself (413, 404 model, 503 no key): core/errors.py sets the header."""
    for name, value in fields:
        if name.lower() == b"x-keyrotor-error":
            return value.decode("latin-1") or None
    return None
