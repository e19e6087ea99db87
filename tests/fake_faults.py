"""Faults the fake upstream can have beyond a key's own: of a request, a model, a key's rate, or everything.

- A request carries its fault in its text, `#fault:NAME` (so it follows the request from key
  to key, like OpenAI's answers to a request that is itself the problem): `too_large`
  (429 "Request too large" with Retry-After: 20), `server_error` (500), `context_length` and
  `content_filter` (400), `hang` (never answers), `stream_cut` (a stream that breaks off after
  two chunks), `stream_stall` (a stream that goes silent after two chunks), `slow_first`
  (a stream whose first byte takes `first_token_seconds`, 1.5 s unless set), `reset` (the
  connection reset before any answer, as a dropped TCP connection: ECONNRESET).
  `NAME_once` (`server_error_once`, `reset_once`, …) has the fault on the request's first attempt
  only, and serves the next: give each request its own mark after it (`#fault:reset_once/17`).
- `model_faults[model]`: every request for that model, whatever the key: `ratelimit_nohint`
  (429 with neither Retry-After nor reset headers), `ratelimit` (429 with Retry-After: 1 and
  OpenAI's x-ratelimit-* headers), `unavailable` (503), `context_length`
  (400 `context_length_exceeded`: a model with a short context), `hang` (never answers) or a
  stream fault (`slow_first`, …) on every stream of the model.
- `down`: every request gets 503, as a provider that is down does.
- `key_rpm[key] = (limit, window_seconds)`: the key's own rate limit, answered like OpenAI's
  (429 with retry-after-ms and x-ratelimit-* headers) once `limit` requests fall in the window.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import socket
import struct
import threading
import time
from typing import Any

from starlette.responses import Response

FAULT = re.compile(rb"#fault:([a-z_]+?)(_once(?:/\w+)?)?(?![a-z_])")
STREAM_FAULTS = frozenset({"stream_cut", "stream_stall", "slow_first"})
HANG_SECONDS = 3600.0


ONCE_SUFFIX = "_once"


class StreamBroken(Exception):
    """Raised inside a streamed body: the server drops the connection mid-stream."""


def _error(status: int, message: str, type_: str, code: str | None, headers: dict[str, str] | None = None):
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return Response(json.dumps(body), status, headers or {}, "application/json")


class Faults:
    def __init__(self) -> None:
        self.model_faults: dict[str, str] = {}
        self.down = False
        self.key_rpm: dict[str, tuple[int, float]] = {}
        self.first_token_seconds = 1.5  # how long `slow_first` holds a stream's first event
        self._lock = threading.Lock()
        self._seen: dict[str, collections.deque[float]] = {}
        self._once: set[bytes] = set()  # the marks of `NAME_once` requests whose first attempt had the fault

    def clear(self) -> None:
        with self._lock:
            self.model_faults.clear()
            self.down = False
            self.key_rpm.clear()
            self._seen.clear()
            self._once.clear()
        self.first_token_seconds = 1.5

    @staticmethod
    def of_request(body: bytes) -> str | None:
        """The request's own fault, `NAME_once` ones included (as NAME_once)."""
        match = FAULT.search(body)
        return match.group(1).decode() + (ONCE_SUFFIX if match.group(2) else "") if match else None

    def _of_attempt(self, body: bytes) -> str | None:
        """The fault of this attempt of the request: a `NAME_once` fault on its first attempt only."""
        match = FAULT.search(body)
        if match is None:
            return None
        if match.group(2):
            with self._lock:
                if match.group(0) in self._once:
                    return None
                self._once.add(match.group(0))
        return match.group(1).decode()

    async def answer(self, key: str, body: bytes) -> Response | None:
        """The fault's answer for this request, or None when it is served (perhaps with a stream fault)."""
        if self.down:
            return _error(503, "The server is overloaded or not ready yet.", "server_error", None)
        limited = self._over_rate(key)
        if limited is not None:
            return limited
        model = _model(body)
        fault = self.model_faults.get(model) if model else None
        if fault == "ratelimit_nohint":
            message = f"Rate limit reached for {model} in organization org-fake on requests per min (RPM)."
            return _error(429, message, "requests", "rate_limit_exceeded")
        if fault == "ratelimit":
            message = (
                f"Rate limit reached for {model} in organization org-fake on requests per min (RPM): Limit 500,"
                " Used 500, Requested 1. Please try again in 1s."
                " Visit https://platform.openai.com/account/rate-limits to learn more."
            )
            headers = {
                "retry-after": "1",
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1s",
            }
            return _error(429, message, "requests", "rate_limit_exceeded", headers)
        if fault == "unavailable":
            return _error(503, "The engine is currently overloaded, please try again later", "server_error", None)
        if fault == "context_length":
            message = "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000."
            return _error(400, message, "invalid_request_error", "context_length_exceeded")
        if fault == "hang":
            await asyncio.sleep(HANG_SECONDS)
        fault = self._of_attempt(body)
        if fault == "reset":
            return _reset  # type: ignore[return-value]
        if fault == "too_large":
            message = (
                f"Request too large for {model} in organization org-fake on tokens per min (TPM): Limit 30000,"
                " Requested 45000. The input or output tokens must be reduced in order to run successfully."
            )
            return _error(429, message, "tokens", "rate_limit_exceeded", {"retry-after": "20"})
        if fault == "server_error":
            return _error(500, "The server had an error while processing your request.", "server_error", None)
        if fault == "context_length":
            message = "This model's maximum context length is 128000 tokens. However, your messages resulted in 200000."
            return _error(400, message, "invalid_request_error", "context_length_exceeded")
        if fault == "content_filter":
            message = "The response was filtered due to the prompt triggering content management policy."
            return _error(400, message, "invalid_request_error", "content_filter")
        if fault == "hang":
            await asyncio.sleep(HANG_SECONDS)
        return None

    def stream_fault(self, body: bytes) -> str | None:
        """How a stream for this request breaks: its model's stream fault, else the request's own."""
        model = _model(body)
        fault = self.model_faults.get(model) if model else None
        return fault if fault in STREAM_FAULTS else self.of_request(body)

    def _over_rate(self, key: str) -> Response | None:
        rule = self.key_rpm.get(key)
        if rule is None:
            return None
        limit, window = rule
        now = time.monotonic()
        with self._lock:
            seen = self._seen.setdefault(key, collections.deque())
            while seen and now - seen[0] >= window:
                seen.popleft()
            if len(seen) < limit:
                seen.append(now)
                return None
            wait = window - (now - seen[0])
        headers = {
            "retry-after-ms": str(max(1, int(wait * 1000))),
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": f"{wait:.3f}s",
        }
        message = f"Rate limit reached on requests per min (RPM): Limit {limit}, Used {limit}, Requested 1."
        return _error(429, message, "requests", "rate_limit_exceeded", headers)


def _model(body: bytes) -> str | None:
    try:
        data: Any = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


async def _reset(scope, receive, send) -> None:
    """An ASGI answer that is none: the connection is reset (RST, no byte of an answer), as a load
    balancer or a crashed upstream process drops it. uvicorn's `send` is its request cycle's method,
    and the cycle holds the connection's transport."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:  # another server: the nearest thing, a connection closed without an answer
        raise StreamBroken("reset")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
    transport.abort()
    await asyncio.sleep(0)  # connection_lost runs: uvicorn sees the client gone, and sends no 500 of its own


async def faulty_stream(events, fault: str | None, first_token_seconds: float = 1.5):
    """The stream's events, broken the way `fault` says."""
    sent = 0
    async for event in events:
        if fault == "slow_first" and sent == 0:
            await asyncio.sleep(first_token_seconds)
        if sent == 2 and fault == "stream_cut":
            raise StreamBroken("the stream broke off")
        if sent == 2 and fault == "stream_stall":
            await asyncio.sleep(HANG_SECONDS)
        yield event
        sent += 1
