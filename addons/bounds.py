"""What a client can make the proxy hold: bodies up to a size, headers for a while, refusals for nothing.

mitmproxy reads a request's whole body into memory before its `request` hook, even when
an addon answered the flow at `requestheaders`: four unauthenticated 250 MB posts grew
the proxy to 2 GB. The patch below sends an answer set at `requestheaders` at once and
reads the rest of that body only to throw it away (up to `proxy_max_body_bytes`, then
the connection is closed), and stops buffering a body that outgrows the limit. It is
the same kind of patch as addons/recovery.py, on mitmproxy's HttpStream.

Connections that never finish their request headers are closed after
`proxy_header_timeout_seconds`: mitmproxy itself only closes connections that are
silent for `tcp_timeout` (ten minutes), which a client trickling a byte now and then
never is. The deadline runs only once a connection's last answer has gone out: a request
whose answer is still being retried or failed over (addons/keypool.py awaits those in its
`response` and `error` hooks, which run after this addon's) keeps its client, however long
the retries take.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Generator

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.utils import human

from config import ConfigError, Settings, checked_options, default_of
from core.errors import OpenAIError

requests_log = logging.getLogger("keyrotor.requests")  # one request's line: the console shows it with --verbose

# mitmproxy's own, taken as the patch goes in.
_wait_for_request_headers: Callable[..., Generator]
_consume_request_body: Callable[..., Generator]
_installed = False


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"The request body is larger than this gateway accepts ({limit} bytes, proxy.max_body_bytes).",
        "invalid_request_error",
        "request_too_large",
        {"x-should-retry": "false"},
    )


def declared_size(request: http.Request) -> int | None:
    """The body size the client announced, None when it did not (chunked) or made no sense."""
    value = request.headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _limit(stream: http_layer.HttpStream) -> int:
    return getattr(stream.context.options, "proxy_max_body_bytes", 0)


def _state_wait_for_request_headers(self: http_layer.HttpStream, event: http_layer.RequestHeaders) -> Generator:
    yield from _wait_for_request_headers(self, event)
    if self.flow.response is not None and not event.end_stream and self.client_state == self.state_consume_request_body:
        yield from _answer_before_body(self)


def _state_consume_request_body(self: http_layer.HttpStream, event: events.Event) -> Generator:
    limit = _limit(self)
    if isinstance(event, http_layer.RequestData) and limit and len(self.request_body_buf) + len(event.data) > limit:
        # A body without Content-Length (chunked) that outgrew the limit: stop buffering it.
        error = too_large(limit)
        self.flow.response = http.Response.make(error.status, error.body(), error.all_headers())
        yield from _answer_before_body(self)
        return
    yield from _consume_request_body(self, event)


def _answer_before_body(self: http_layer.HttpStream) -> Generator:
    """Send the answer an addon set while the body is still arriving; read the rest only to drop it."""
    response = self.flow.response
    assert response is not None, "an addon set the answer"
    response.headers["connection"] = "close"  # the client need not wait for a reused connection
    response.timestamp_start = time.time()
    self.request_body_buf.clear()
    self.client_state = _discarding(self, max(_limit(self), 1))
    yield http_layer.HttpResponseHeadersHook(self.flow)
    if (yield from self.check_killed(True)):
        return
    yield from self.send_response()  # the response hook, then the answer
    yield http_layer.SendHttp(http_layer.ResponseEndOfMessage(self.stream_id), self.context.client)


def _discarding(stream: http_layer.HttpStream, budget: int) -> Callable[[events.Event], Generator]:
    """A client state that drops body data, and closes the connection after `budget` bytes of it."""
    left = budget

    def discard(event: events.Event) -> Generator:
        nonlocal left
        if isinstance(event, http_layer.RequestData):
            left -= len(event.data)
            if left < 0:
                stream.client_state = stream.state_errored
                yield commands.CloseConnection(stream.context.client)
        elif isinstance(event, http_layer.RequestEndOfMessage):
            stream.client_state = stream.state_done
            stream.flow.live = False
            yield http_layer.DropStream(stream.stream_id)

    return discard


def install() -> None:
    """Once per process, like addons/recovery.py's; addons/patches.py installs it, with the others."""
    global _wait_for_request_headers, _consume_request_body, _installed
    if _installed:
        return
    _wait_for_request_headers = http_layer.HttpStream.state_wait_for_request_headers
    _consume_request_body = http_layer.HttpStream.state_consume_request_body
    # Patches replace methods of mitmproxy's class, which mypy allows no assignment to.
    http_layer.HttpStream.state_wait_for_request_headers = _state_wait_for_request_headers  # type: ignore[method-assign]
    http_layer.HttpStream.state_consume_request_body = _state_consume_request_body  # type: ignore[method-assign]
    _installed = True


class Bounds:
    def __init__(self, defaults: Settings | None = None) -> None:
        self._defaults = defaults
        # By client connection id: since when it waits for a request's headers (time.monotonic()),
        # and the ids of its flows whose headers came but which are not finished.
        self._waiting: dict[str, float] = {}
        self._in_flight: dict[str, set[str]] = {}
        # By client connection id: its last flow, finished as far as this addon's hooks go, while
        # later addons' hooks may still work on it (a retry): the deadline waits until it is sent.
        self._answering: dict[str, http.HTTPFlow] = {}
        self._sweeper: asyncio.Task | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "proxy_max_body_bytes",
            int,
            default_of(self._defaults, "proxy.max_body_bytes"),
            "Largest request body accepted, in bytes; larger ones get a 413.",
        )
        loader.add_option(
            "proxy_header_timeout_seconds",
            int,
            default_of(self._defaults, "proxy.header_timeout_seconds"),
            "A connection that has not sent a request's whole headers this long after it opened"
            " or after its last answer is closed.",
        )

    def configure(self, updated: set[str]) -> None:
        try:
            checked_options(ctx.options, updated, ["proxy.max_body_bytes", "proxy.header_timeout_seconds"])
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None

    def running(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep())

    def done(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()

    # ------------------------------------------------------------------ body size

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._headers_arrived(flow)
        if flow.response is None:
            size = declared_size(flow.request)
            limit = ctx.options.proxy_max_body_bytes
            if size is not None and size > limit:
                error = too_large(limit)
                flow.response = http.Response.make(error.status, error.body(), error.all_headers())
        if flow.response is not None:
            # Answered at the headers: a client waiting for "100 Continue" need not send the body.
            flow.request.headers.pop("expect", None)

    # ------------------------------------------------------------------ header deadline

    def client_connected(self, client: connection.Client) -> None:
        self._waiting[client.id] = time.monotonic()

    def client_disconnected(self, client: connection.Client) -> None:
        self._waiting.pop(client.id, None)
        self._in_flight.pop(client.id, None)
        self._answering.pop(client.id, None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _headers_arrived(self, flow: http.HTTPFlow) -> None:
        client_id = flow.client_conn.id
        self._waiting.pop(client_id, None)
        self._answering.pop(client_id, None)
        self._in_flight.setdefault(client_id, set()).add(flow.id)

    def _finished(self, flow: http.HTTPFlow) -> None:
        client_id = flow.client_conn.id
        in_flight = self._in_flight.get(client_id)
        if in_flight is None or flow.id not in in_flight:
            return
        in_flight.discard(flow.id)
        # A request answered before its body was read closes its connection once the body is
        # in (connection: close): no next request to wait for.
        # An accepted WebSocket session sends no more requests on its connection: no deadline then.
        if not in_flight and flow.request.timestamp_end is not None and flow.websocket is None:
            self._waiting[client_id] = time.monotonic()
            self._answering[client_id] = flow

    async def _sweep(self) -> None:
        # One timer for all connections, not one per request: a dict entry is all a request costs.
        while True:
            timeout = ctx.options.proxy_header_timeout_seconds
            await asyncio.sleep(min(1.0, timeout / 2))
            for client_id in self.expired(time.monotonic(), timeout):
                self._close(client_id, timeout)

    def expired(self, now: float, timeout: float) -> list[str]:
        """The connections whose header deadline ran out by `now` (forgotten here; the caller closes them)."""
        expired = []
        for client_id, since in list(self._waiting.items()):
            answering = self._answering.get(client_id)
            if answering is not None:
                # mitmproxy marks a flow not live once its answer went out (or it failed): the
                # deadline starts then, as a sweep notices, never while the answer is retried.
                if not answering.live:
                    del self._answering[client_id]
                self._waiting[client_id] = now
                continue
            if now - since >= timeout:
                del self._waiting[client_id]
                expired.append(client_id)
        return expired

    def _close(self, client_id: str, timeout: int) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(client_id) if proxyserver else None
        if handler is None:
            return
        io = handler.transports.get(handler.client)
        if io is not None and io.handler is not None:
            requests_log.info(
                "%s: closed, no complete request headers within %d s",
                human.format_address(handler.client.peername),
                timeout,
            )
            io.handler.cancel("no complete request headers in time")
