"""A retried stream reaches the client as upstream sends it, through mitmproxy's own stream.

The key pool retries with httpx (core/failover.py): mitmproxy cannot send a flow twice. A
retried event stream is judged on its headers and first chunk; the key pool then leaves it
here (`pending`, by flow id), and this patch of mitmproxy's HttpStream, where the stream would
otherwise send the retried answer whole, feeds it into the stream's own event handling instead:
its headers as if upstream's connection had sent them (the `responseheaders` hooks run, the
credential sender's echo filter and decoder take it, the upstream watch holds the headers for
the first byte), its first chunk, then each later chunk as httpx reads it, injected into the
flow's layer like the upstream watch's timeouts, and its end or break. Everything a first
attempt's stream gets — capture's tee, usage stripping, spend's meter, renamed models, the
SSE error event of a stream broken after bytes reached the client, the `response` hook at its
end — it gets the same way, because it is the same code.

So that no addon's `response` hook runs for an answer that is then retried, an answer that may
be (status 400 and above, its request not settled) first goes through the `keyrotor_answered`
hook, which only the key pool has: a retry runs there, before the `response` hook.

Why not let mitmproxy send the request again over a new server connection within the same
stream: it would move the retry loop (waits for keys, deadlines, fallbacks; core/failover.py,
tested as a table without a proxy) into hook-by-hook state spread over mitmproxy's stream
states, and a retry's own upstream connection errors into mitmproxy's. Here only the answer
that the client gets is handed to mitmproxy, once it is chosen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import cast

import httpx
from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http._events import ErrorCode

from core import upstream
from core.credentials import KeyHandoff
from core.metadata import KeyUse

log = logging.getLogger(__name__)

# The events of upstream's answer, which a fed stream takes from the pump only.
RESPONSE_EVENTS = (
    http_layer.ResponseHeaders,
    http_layer.ResponseData,
    http_layer.ResponseTrailers,
    http_layer.ResponseEndOfMessage,
    http_layer.ResponseProtocolError,
)


@dataclass
class KeyrotorAnsweredHook(commands.StartHook):
    """An answer that may be retried has come, before the `response` hook: the key pool's retry runs here."""

    name = "keyrotor_answered"
    flow: http.HTTPFlow


@dataclass(frozen=True)
class _Pumped:
    """The injected message: the next event of a retried stream, read by the pump."""

    event: http_layer.HttpEvent


_active: RetryStream | None = None
_pumps: dict[str, asyncio.Task] = {}  # by flow id
_limits = {"idle": 120.0}
_installed = False


class RetryStream:
    """The key pool leaves a retried stream in `pending` (flow id → core.upstream.Answer with its rest
    to read); the patch, installed by addons/patches.py, feeds it to the client."""

    def __init__(self, sender: KeyHandoff | None = None) -> None:
        self.pending: dict[str, upstream.Answer] = {}
        self.installed = False
        self.sender = sender  # addons/credential_sender.py's: it replaces the retry key's echo as the stream passes

    def load(self, loader: Loader) -> None:
        global _active
        _active = self
        self.installed = _installed  # without the patch, the key pool reads a retried stream whole

    def configure(self, updated: set[str]) -> None:
        if hasattr(ctx.options, "keypool_stream_idle_seconds"):
            _limits["idle"] = float(ctx.options.keypool_stream_idle_seconds)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.error is not None:  # the client left, or the stream broke: upstream is read no more
            self._let_go(flow.id)

    def done(self) -> None:
        global _active
        for flow_id in list(self.pending) + list(_pumps):
            self._let_go(flow_id)
        if _active is self:
            _active = None

    def _let_go(self, flow_id: str) -> None:
        pump = _pumps.pop(flow_id, None)
        if pump is not None:
            pump.cancel()
        if self.sender is not None:
            self.sender.answering.pop(flow_id, None)
        answer = self.pending.pop(flow_id, None)
        if answer is not None:
            asyncio.get_running_loop().create_task(answer.discard())


# ---------------------------------------------------------------------- the patches

# What the patches wrap, taken as they go in.
_inner_stream_event: Callable[[http_layer.HttpStream, events.Event], Generator]
_inner_layer_event: Callable[[http_layer.HttpLayer, events.Event], Generator]
_inner_send_response: Callable[..., Generator]


def install() -> None:
    """Once per process; wraps what is installed now: addons/patches.py installs it after the upstream
    watch's patches of the same methods, so that a fed stream's events reach them like upstream's."""
    global _inner_stream_event, _inner_layer_event, _inner_send_response, _installed
    if _installed:
        return
    _inner_stream_event = http_layer.HttpStream._handle_event
    _inner_layer_event = http_layer.HttpLayer._handle_event
    _inner_send_response = http_layer.HttpStream.send_response
    # Patches replace methods of mitmproxy's classes, which mypy allows no assignment to.
    http_layer.HttpStream._handle_event = _stream_event  # type: ignore[method-assign]
    http_layer.HttpLayer._handle_event = _layer_event  # type: ignore[method-assign]
    http_layer.HttpStream.send_response = _send_response  # type: ignore[method-assign]
    _installed = True


def _layer_event(self: http_layer.HttpLayer, event: events.Event) -> Generator:
    # A pumped event goes straight to its flow's stream, whatever the HTTP version (a plain
    # function: the common case adds no generator).
    if type(event) is events.MessageInjected and type(event.message) is _Pumped:
        return _route(self, event)
    return _inner_layer_event(self, event)


def _route(self: http_layer.HttpLayer, event: events.MessageInjected) -> Generator:
    for stream in list(self.streams.values()):
        if stream.__dict__.get("flow") is event.flow and "_handle_event" not in stream.__dict__:
            yield from self.event_to_child(stream, event)


def _stream_event(self: http_layer.HttpStream, event: events.Event) -> Generator:
    kind = type(event)
    if kind is events.MessageInjected:
        message = cast(events.MessageInjected, event).message
        if type(message) is _Pumped:
            if "_keyrotor_fed" not in self.__dict__:
                return _ignored()
            return _inner_stream_event(self, message.event)
    elif "_keyrotor_fed" in self.__dict__ and isinstance(event, RESPONSE_EVENTS):
        return _ignored()  # late words of the earlier attempt's connection: this stream is fed now
    return _inner_stream_event(self, event)


def _ignored() -> Generator:
    yield from ()


def _send_response(self: http_layer.HttpStream, already_streamed: bool = False) -> Generator:
    """Where mitmproxy sends an answer it has whole (or ends a stream): a retry may come first, and
    a retried stream is fed instead."""
    flow = self.flow
    if _active is not None and _active.pending and flow.id in _active.pending:
        return _fed(self, _active.pending.pop(flow.id))  # the key pool's error hook recovered the flow
    response = flow.response
    if response is None or response.status_code < 400 or already_streamed:
        return _inner_send_response(self, already_streamed)
    use = KeyUse.of(flow.metadata)
    if use is None or use.settled:
        return _inner_send_response(self, already_streamed)
    return _answered_then_sent(self)


def _answered_then_sent(self: http_layer.HttpStream) -> Generator:
    flow = self.flow
    yield KeyrotorAnsweredHook(flow)
    answer = _active.pending.pop(flow.id, None) if _active is not None else None
    if answer is None:
        return (yield from _inner_send_response(self))
    if (yield from self.check_killed(True)):
        asyncio.get_running_loop().create_task(answer.discard())
        return
    yield from _fed(self, answer)


def _fed(self: http_layer.HttpStream, answer: upstream.Answer) -> Generator:
    """The retried stream's headers and first chunk go through the stream's own handling, as if
    upstream's connection had sent them; a pump reads the rest."""
    flow = self.flow
    state = self.__dict__
    state["_keyrotor_fed"] = True
    state.pop("_keyrotor_gone", None)  # the upstream watch's mark of the attempt it timed out
    state.pop("_keyrotor_held", None)
    self.response_body_buf.clear()
    assert flow.response is not None, "the key pool set the retried answer's head"
    self.server_state = self.state_wait_for_response_headers
    sender = _active.sender if _active is not None else None
    if answer.echo is not None and sender is not None and sender.installed:
        sender.answering[flow.id] = answer.echo  # taken as the head below passes the sender's patch
    yield from _inner_stream_event(self, http_layer.ResponseHeaders(self.stream_id, flow.response, False))
    if self.server_state not in (self.state_stream_response_body, self.state_consume_response_body):
        asyncio.get_running_loop().create_task(answer.discard())
        return  # killed or refused at its headers
    yield from _inner_stream_event(self, http_layer.ResponseData(self.stream_id, answer.content))
    _pumps[flow.id] = asyncio.get_running_loop().create_task(_pump(flow, self.stream_id, answer))


async def _pump(flow: http.HTTPFlow, stream_id: int, answer: upstream.Answer) -> None:
    """Each chunk as httpx reads it, into the flow's layer, then its end or its break."""
    rest = answer.rest
    assert rest is not None, "a stream is handed on with its rest"
    idle = _limits["idle"]
    try:
        while flow.live:
            try:
                chunk = await asyncio.wait_for(anext(rest, None), idle)
            except TimeoutError:
                message = f"upstream timed out: nothing for {idle:g} s"
                _inject(flow, http_layer.ResponseProtocolError(stream_id, message, ErrorCode.GENERIC_SERVER_ERROR))
                return
            except httpx.HTTPError as e:
                message = upstream.error_text(e)
                _inject(flow, http_layer.ResponseProtocolError(stream_id, message, ErrorCode.GENERIC_SERVER_ERROR))
                return
            if chunk is None:
                _inject(flow, http_layer.ResponseEndOfMessage(stream_id))
                return
            _inject(flow, http_layer.ResponseData(stream_id, chunk))
    except ValueError:
        pass  # the client's connection is gone: nobody to feed
    finally:
        if _pumps.get(flow.id) is asyncio.current_task():
            del _pumps[flow.id]
        await answer.discard()


def _inject(flow: http.HTTPFlow, event: http_layer.HttpEvent) -> None:
    ctx.master.addons.get("proxyserver").inject_event(events.MessageInjected(flow, _Pumped(event)))
