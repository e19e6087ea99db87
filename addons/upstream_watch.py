"""Time limits on the exchanges mitmproxy sends upstream, and streams that end loudly when they break.

mitmproxy waits for an upstream as long as its connection stays open. This watches each
exchange it sends (the first attempt of every request; retries go through httpx, whose
client has the same limit):
- no response headers within `keypool_attempt_timeout_seconds` of the request leaving,
- no first body byte within `keypool_attempt_timeout_seconds` of the headers, and after it
  no silence longer than `keypool_stream_idle_seconds` (whole bodies: attempt_timeout),
- an event stream whose first byte has not come within `keypool_first_token_seconds` of the
  request leaving (0: no such limit; a whole answer is written before its first byte),
end the exchange: its upstream connection is closed and the flow gets the error
"upstream timed out …", which the key pool retries like a lost connection while nothing
has reached the client (a key that hangs is a key that failed).

A streamed answer's headers wait for its first byte, so that a stream that fails before
any byte reached the client can still be retried like any other failure. A stream that
breaks once bytes reached the client (stalled, reset, cut) ends with an SSE error event in
OpenAI's shape and a proper end of the response, never a truncation that looks complete.

One sweep four times a second checks the exchanges in flight (a dict by flow id) rather
than a timer per request; a timeout reaches the exchange's own layer as an injected event,
so it is acted on in the layer's order like anything upstream says.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import cast

from mitmproxy import ctx, http
from mitmproxy import flow as mitm_flow
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http._events import ErrorCode

from core.metadata import FIRST_BYTE_AT

requests_log = logging.getLogger("keyrotor.requests")  # one request's line: the console shows it with --verbose

SWEEP_SECONDS = 0.25
STREAM_ERROR_CODE = "upstream_stream_interrupted"


@dataclass
class _Clock:
    flow: mitm_flow.Flow  # the mitmproxy flow whose exchange this times
    since: float  # the request left, headers came, or the last byte came
    limit: float
    sent: float = 0.0  # the request left
    streaming: bool = False  # a streamed answer's first byte came


@dataclass(frozen=True)
class _Timeout:
    """The injected message: this exchange has been silent too long."""

    message: str


_watched: dict[str, _Clock] = {}  # by flow id
_limits = {"attempt": 600.0, "idle": 120.0, "first_token": 0.0}


def sse_error_event(message: str) -> bytes:
    """The last event of a broken stream: the OpenAI SDKs raise it as an APIError."""
    error = {"message": message, "type": "server_error", "param": None, "code": STREAM_ERROR_CODE}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


class UpstreamWatch:
    """`running` starts the sweep; the patches below are installed by addons/patches.py."""

    def __init__(self) -> None:
        self._task: asyncio.Task | None = None

    def configure(self, updated: set[str]) -> None:
        options = ctx.options
        if hasattr(options, "keypool_attempt_timeout_seconds"):
            _limits["attempt"] = float(options.keypool_attempt_timeout_seconds)
        if hasattr(options, "keypool_stream_idle_seconds"):
            _limits["idle"] = float(options.keypool_stream_idle_seconds)
        if hasattr(options, "keypool_first_token_seconds"):
            _limits["first_token"] = float(options.keypool_first_token_seconds)

    def running(self) -> None:
        self._task = asyncio.create_task(self._sweep())

    def request(self, flow: http.HTTPFlow) -> None:
        # Every addon's request hook has run (the key pool has its key): the request leaves now.
        if flow.response is None:
            now = time.time()
            _watched[flow.id] = _Clock(flow, now, _limits["attempt"], now)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        _watched.pop(flow.id, None)  # a session, not an exchange: it lasts as long as its ends want

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
        _watched.clear()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            # A function of its own: a loop variable left in this coroutine's frame would keep the
            # last flow it saw alive (its bodies too) until the next exchange is watched.
            _expire(time.time())


def _expire(now: float) -> None:
    """Every watched exchange silent past its limit is told so, on its own layer."""
    first_token = _limits["first_token"]
    for flow_id, clock in list(_watched.items()):
        if now - clock.since >= clock.limit:
            message = f"upstream timed out: nothing for {clock.limit:g} s"
        elif first_token and now - clock.sent >= first_token and _awaits_first_token(clock):
            message = f"upstream timed out: no first token for {first_token:g} s"
        else:
            continue
        del _watched[flow_id]  # handed to the exchange's layer, which may have ended meanwhile
        try:
            proxyserver = ctx.master.addons.get("proxyserver")
            proxyserver.inject_event(events.MessageInjected(clock.flow, _Timeout(message)))
        except ValueError:
            pass  # the client's connection is gone already


def _awaits_first_token(clock: _Clock) -> bool:
    """An event stream whose headers came (held from the client) and whose first byte has not."""
    if clock.streaming:
        return False
    response = clock.flow.response if isinstance(clock.flow, http.HTTPFlow) else None
    return response is not None and "text/event-stream" in response.headers.get("content-type", "")


# ---------------------------------------------------------------------- the patches

# What the patches wrap, taken as they go in.
_inner_stream_event: Callable[[http_layer.HttpStream, events.Event], Generator]
_inner_layer_event: Callable[[http_layer.HttpLayer, events.Event], Generator]
_installed = False


def install() -> None:
    """Idempotent; wraps what is installed now: addons/patches.py installs it after
    addons/credential_sender.py's patch of the same method, so that this one sees each event first."""
    global _inner_stream_event, _inner_layer_event, _installed
    if _installed:  # (addons/retry_stream.py's patch may wrap these since: what is installed now is not ours)
        return
    # Patches replace methods of mitmproxy's classes, which mypy allows no assignment to.
    _inner_stream_event = http_layer.HttpStream._handle_event
    http_layer.HttpStream._handle_event = _watched_stream_event  # type: ignore[method-assign]
    _inner_layer_event = http_layer.HttpLayer._handle_event
    http_layer.HttpLayer._handle_event = _layer_event  # type: ignore[method-assign]
    http_layer.HttpStream.start_response_stream = _start_response_stream_held  # type: ignore[method-assign]
    _installed = True


def _layer_event(self: http_layer.HttpLayer, event: events.Event) -> Generator:
    # Our timeout goes straight to the flow's stream: mitmproxy's own routing of injected
    # messages knows HTTP/1 connections only. (A plain function: the common case adds no generator.)
    if type(event) is events.MessageInjected and isinstance(event.message, _Timeout):
        return _route_timeout(self, event)
    return _inner_layer_event(self, event)


def _route_timeout(self: http_layer.HttpLayer, event: events.MessageInjected) -> Generator:
    for stream in list(self.streams.values()):
        # A stream that became a WebSocket passes events to its session: no exchange to time out.
        if stream.__dict__.get("flow") is event.flow and "_handle_event" not in stream.__dict__:
            yield from self.event_to_child(stream, event)


def _start_response_stream_held(self: http_layer.HttpStream) -> Generator:
    """mitmproxy sends a stream's headers at once; they wait for the first byte here."""
    self.__dict__["_keyrotor_held"] = True  # state of ours on mitmproxy's stream, read from its __dict__
    self.flow.metadata[FIRST_BYTE_AT] = 0.0
    self.server_state = self.state_stream_response_body
    yield from ()


def _release_headers(self: http_layer.HttpStream) -> Generator:
    self.__dict__["_keyrotor_held"] = False
    self.flow.metadata[FIRST_BYTE_AT] = time.time()
    response = self.flow.response
    assert response is not None, "its headers came"
    headers = http_layer.ResponseHeaders(self.stream_id, response, False)
    yield http_layer.SendHttp(headers, self.context.client)


def _watched_stream_event(self: http_layer.HttpStream, event: events.Event) -> Generator:
    """A plain function: an event that needs nothing from here goes on without another generator."""
    kind = type(event)
    state = self.__dict__
    if kind is http_layer.ResponseData or kind is http_layer.ResponseHeaders:
        if state.get("_keyrotor_gone"):
            return _ignored()
        clock = _watched.get(self.flow.id)
        if clock is not None:
            clock.since = time.time()
            response = self.flow.response
            streamed_byte = kind is http_layer.ResponseData and response is not None and response.stream
            clock.limit = _limits["idle"] if streamed_byte else _limits["attempt"]
            clock.streaming = clock.streaming or bool(streamed_byte)
        if kind is http_layer.ResponseData and state.get("_keyrotor_held"):
            return _released_then(self, event)
    elif kind is http_layer.ResponseEndOfMessage or kind is http_layer.ResponseTrailers:
        if state.get("_keyrotor_gone"):
            return _ignored()
        _watched.pop(self.flow.id, None)  # the whole answer is in
        if state.get("_keyrotor_held"):
            return _released_then(self, event)
    elif kind is http_layer.ResponseProtocolError:
        if state.get("_keyrotor_gone"):
            return _ignored()  # what the connection we closed still says is too late
        _watched.pop(self.flow.id, None)
        if _bytes_reached_client(self):
            error = cast(http_layer.ResponseProtocolError, event)
            return _end_stream(self, f"upstream broke off the stream: {error.message}")
    elif kind is events.MessageInjected:
        message = cast(events.MessageInjected, event).message
        if isinstance(message, _Timeout):
            return _time_out(self, message.message)
    return _inner_stream_event(self, event)


def _ignored() -> Generator:
    yield from ()


def _released_then(self: http_layer.HttpStream, event: events.Event) -> Generator:
    yield from _release_headers(self)
    yield from _inner_stream_event(self, event)


def _bytes_reached_client(self: http_layer.HttpStream) -> bool:
    return self.server_state == self.state_stream_response_body and not self.__dict__.get("_keyrotor_held", False)


def _time_out(self: http_layer.HttpStream, message: str) -> Generator:
    flow = self.flow
    _watched.pop(flow.id, None)
    if self.__dict__.get("_keyrotor_gone"):
        return
    waiting = (self.state_wait_for_response_headers, self.state_consume_response_body)
    streaming = self.server_state == self.state_stream_response_body
    if self.server_state not in waiting and not streaming:
        return  # it ended meanwhile
    requests_log.info("%s %s: %s", flow.request.method, flow.request.path, message)
    self.__dict__["_keyrotor_gone"] = True
    yield commands.CloseConnection(self.context.server)
    if _bytes_reached_client(self):
        return (yield from _end_stream(self, message))
    # Nothing reached the client: an error like a lost connection, which the key pool retries.
    self.__dict__["_keyrotor_held"] = False
    yield from self.handle_protocol_error(
        http_layer.ResponseProtocolError(self.stream_id, message, ErrorCode.GENERIC_SERVER_ERROR)
    )


def _end_stream(self: http_layer.HttpStream, message: str) -> Generator:
    """The stream reached the client and broke: say so in the stream itself, then end it properly."""
    flow = self.flow
    flow.error = mitm_flow.Error(message)
    yield http_layer.HttpErrorHook(flow)
    if self.client_state != self.state_errored:
        if flow.response is not None and "text/event-stream" in flow.response.headers.get("content-type", ""):
            client = self.context.client
            yield http_layer.SendHttp(http_layer.ResponseData(self.stream_id, sse_error_event(message)), client)
            yield http_layer.SendHttp(http_layer.ResponseEndOfMessage(self.stream_id), client)
        else:  # not an event stream: nothing can be said inside it, so it is cut as mitmproxy would
            error = http_layer.ResponseProtocolError(self.stream_id, message, ErrorCode.GENERIC_SERVER_ERROR)
            yield http_layer.SendHttp(error, self.context.client)
    self.server_state = self.state_errored
    flow.live = False
    yield http_layer.DropStream(self.stream_id)
