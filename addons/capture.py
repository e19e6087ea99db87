"""What happened: every flow becomes one row, streamed responses teed without buffering.

Hooks only take a snapshot and queue it; decoding, JSON parsing and truncation run
in the writer thread (CapturedFlow.to_row), never on the event loop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.net import encoding

from config import BODY_MODES, default_of
from storage import writer
from storage.prices import PriceFileError, PriceTable, load_prices

log = logging.getLogger(__name__)

REDACTED_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie", "set-cookie"}
)
REDACTED = "[redacted]"
RECORDED = "keyrotor.capture.recorded"


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


def redact(fields: tuple[tuple[bytes, bytes], ...]) -> list[list[str]]:
    rows = []
    for raw_name, raw_value in fields:
        name = raw_name.decode("latin-1")
        rows.append([name, REDACTED if name.lower() in REDACTED_HEADERS else raw_value.decode("latin-1")])
    return rows


def decoded(raw: bytes | None, content_encoding: str | None) -> bytes:
    if not raw:
        return b""
    if content_encoding:
        try:
            return encoding.decode(raw, content_encoding)
        except ValueError:
            return raw  # unknown or corrupt encoding: keep what travelled
    return raw


def json_object(body: bytes) -> dict[str, Any] | None:
    if not body or body[:1] not in (b"{", b" ", b"\n"):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def sse_usage(body: bytes) -> dict[str, Any] | None:
    """The usage object of a streamed completion: in the last data event that carries one."""
    for line in reversed(body.split(b"\n")):
        if line.startswith(b"data:") and b'"usage"' in line:
            event = json_object(line[5:].strip())
            if event and isinstance(event.get("usage"), dict):
                return event["usage"]
    return None


def stored_body(body: bytes, mode: str, limit: int) -> tuple[str | None, bool]:
    if mode == "none":
        return None, False
    truncated = mode == "truncated" and len(body) > limit
    kept = body[:limit] if truncated else body
    return kept.decode("utf-8", errors="replace"), truncated


@dataclass
class CapturedFlow:
    """Everything a row needs, copied from the flow on the event loop (cheap references only)."""

    flow_id: str
    started_at: float
    method: str
    path: str
    client_addr: str | None
    request_fields: tuple
    request_body: bytes | None
    request_encoding: str | None
    client_key_id: int | None
    upstream_key_id: int | None
    body_mode: str
    max_body_bytes: int
    status: int | None = None
    first_byte_at: float | None = None
    ended_at: float | None = None
    response_fields: tuple = ()
    response_body: bytes | None = None
    response_chunks: list[bytes] | None = None  # a streamed body, joined in the writer thread
    response_encoding: str | None = None
    is_sse: bool = False
    chunk_times: list[tuple[float, int]] | None = None
    error: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # the key pool's, one per upstream try
    prices: PriceTable = field(default_factory=PriceTable)  # shared by every flow, loaded once in configure

    def to_row(self) -> dict[str, Any]:
        request_body = decoded(self.request_body, self.request_encoding)
        raw_response = b"".join(self.response_chunks) if self.response_chunks is not None else self.response_body
        response_body = decoded(raw_response, self.response_encoding)
        # Parse only bodies that can hold what the row needs (a substring test is far cheaper).
        request_json = json_object(request_body) if b'"model"' in request_body else None
        if self.is_sse:
            usage = sse_usage(response_body)
        else:
            usage = (json_object(response_body) or {}).get("usage") if b'"usage"' in response_body else None
        usage = usage if isinstance(usage, dict) else {}
        stored_request, request_cut = stored_body(request_body, self.body_mode, self.max_body_bytes)
        stored_response, response_cut = stored_body(response_body, self.body_mode, self.max_body_bytes)
        model = (request_json or {}).get("model")
        ended = self.ended_at or time.time()
        return {
            "flow_id": self.flow_id,
            "started_at": self.started_at,
            "first_byte_at": self.first_byte_at,
            "ended_at": ended,
            "duration_ms": round((ended - self.started_at) * 1000, 3),
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "model": model if isinstance(model, str) else None,
            "stream": int(self.is_sse or (request_json or {}).get("stream") is True),
            "client_key_id": self.client_key_id,
            "upstream_key_id": self.upstream_key_id,
            "attempts": len(self.attempts) or int(self.upstream_key_id is not None),
            # Only retried flows get attempt rows: a single attempt is the flow row itself.
            "attempt_rows": self.attempts if len(self.attempts) > 1 else (),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens"),
            "cost": self.prices.cost(model, usage.get("prompt_tokens"), usage.get("completion_tokens")),
            "client_addr": self.client_addr,
            "error": self.error,
            "request_headers": json.dumps(redact(self.request_fields)),
            "response_headers": json.dumps(redact(self.response_fields)),
            "request_body": stored_request,
            "request_body_size": len(request_body),
            "request_body_truncated": int(request_cut),
            "response_body": stored_response,
            "response_body_size": len(response_body),
            "response_body_truncated": int(response_cut),
            "chunk_times": json.dumps(
                [[round((t - (self.first_byte_at or t)) * 1000, 1), n] for t, n in self.chunk_times]
            ) if self.chunk_times else None,
        }  # fmt: skip


class Capture:
    def __init__(self, defaults=None) -> None:
        self._defaults = defaults
        self._tees: dict[str, StreamTee] = {}  # by flow.id: flow.metadata gets deep-copied by mitmweb
        self._writer: writer.Writer | None = None
        self._prices = PriceTable()
        self.db_path: Path | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "capture_bodies", str, default_of(self._defaults, "capture.bodies"),
            f"Bodies to store: {', '.join(BODY_MODES)}.",
        )  # fmt: skip
        loader.add_option(
            "capture_max_body_bytes", int, default_of(self._defaults, "capture.max_body_bytes"),
            "With capture_bodies=truncated, bytes kept of each body.",
        )  # fmt: skip
        loader.add_option(
            "capture_keep_days", int, default_of(self._defaults, "capture.keep_days"),
            "Flows older than this many days are deleted (0: never).",
        )  # fmt: skip
        loader.add_option(
            "capture_max_rows", int, default_of(self._defaults, "capture.max_rows"),
            "Beyond this many flows the oldest are deleted (0: no limit).",
        )  # fmt: skip
        loader.add_option(
            "capture_prices", str, default_of(self._defaults, "capture.prices"),
            "TOML file of model prices (USD per million input and output tokens) for cost estimates.",
        )  # fmt: skip

    def configure(self, updated: set[str]) -> None:
        if "capture_bodies" in updated and ctx.options.capture_bodies not in BODY_MODES:
            raise exceptions.OptionsError(
                f"capture_bodies must be one of {', '.join(BODY_MODES)}, not {ctx.options.capture_bodies!r}."
            )
        if "capture_max_body_bytes" in updated and ctx.options.capture_max_body_bytes <= 0:
            raise exceptions.OptionsError("capture_max_body_bytes must be above zero.")
        if "capture_prices" in updated:
            try:
                self._prices = load_prices(Path(ctx.options.capture_prices).expanduser())
            except PriceFileError as e:
                raise exceptions.OptionsError(f"capture_prices: {e}") from None
        for name in ("capture_keep_days", "capture_max_rows"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name} must be zero or more.")
        if "keyrotor_storage" in updated:
            self.db_path = Path(ctx.options.keyrotor_storage)
        if self._writer:
            self._writer.retention = self._retention()

    def _retention(self) -> writer.Retention:
        return writer.Retention(keep_days=ctx.options.capture_keep_days, max_rows=ctx.options.capture_max_rows)

    def running(self) -> None:
        self._writer = writer.acquire(self.db_path)
        self._writer.retention = self._retention()

    def done(self) -> None:
        if self._writer:
            writer.release(self._writer)  # flushes every queued row
            self._writer = None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if "text/event-stream" not in flow.response.headers.get("content-type", ""):
            return
        inner = flow.response.stream if callable(flow.response.stream) else None
        tee = StreamTee(first_byte=flow.response.timestamp_start or time.time(), inner=inner)
        self._tees[flow.id] = tee
        flow.response.stream = tee

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def _record(self, flow: http.HTTPFlow) -> None:
        # A flow can report both response and error (client gone after the last byte): one row.
        if flow.metadata.get(RECORDED) or self._writer is None:
            return
        flow.metadata[RECORDED] = True
        self._writer.put(self.snapshot(flow))

    def snapshot(self, flow: http.HTTPFlow) -> CapturedFlow:
        request = flow.request
        access = flow.metadata.get("keyrotor.access") or {}
        keypool = flow.metadata.get("keyrotor.keypool") or {}
        captured = CapturedFlow(
            flow_id=flow.id,
            started_at=request.timestamp_start,
            method=request.method,
            path=request.path,
            client_addr=flow.client_conn.peername[0] if flow.client_conn.peername else None,
            request_fields=request.headers.fields,
            request_body=request.raw_content,
            request_encoding=request.headers.get("content-encoding"),
            client_key_id=access.get("client_id"),
            upstream_key_id=keypool.get("key_id"),
            body_mode=ctx.options.capture_bodies,
            max_body_bytes=ctx.options.capture_max_body_bytes,
            error=flow.error.msg if flow.error else None,
            attempts=list(keypool.get("attempts") or ()),
            prices=self._prices,
        )
        response = flow.response
        if response is None:
            captured.ended_at = flow.error.timestamp if flow.error else time.time()
            return captured
        tee = self._tees.pop(flow.id, None)
        captured.status = response.status_code
        captured.first_byte_at = response.timestamp_start
        captured.response_fields = response.headers.fields
        captured.response_encoding = response.headers.get("content-encoding")
        if tee is not None:
            captured.is_sse = True
            captured.response_chunks = tee.chunks
            captured.chunk_times = tee.times
            captured.ended_at = tee.ended_at or response.timestamp_end or time.time()
        else:
            # A stream that arrived whole: a retried attempt's answer (see addons/keypool.py).
            captured.is_sse = "text/event-stream" in response.headers.get("content-type", "")
            # The usage addon may have taken its usage chunk out of what the client got.
            captured.response_body = (flow.metadata.get("keyrotor.usage") or {}).get(
                "upstream_body", response.raw_content
            )
            captured.ended_at = response.timestamp_end or time.time()
        if flow.error:
            captured.ended_at = flow.error.timestamp
        return captured
