"""Lets an `error` hook answer the client after a failed upstream exchange.

mitmproxy 12 always answers a failed exchange (refused, reset, closed before the
whole response) with its own 502 once the error hooks return. The key pool retries
such an attempt with another key inside its error hook; when it succeeds it sets
`flow.response` and clears `flow.error`, and this patch sends that response
instead of the 502. It is what mitmproxy PR #7999 proposes upstream. Nothing
changes for a response that was already streaming to the client: bytes that
reached the client cannot be taken back.

Where no retry helped, and wherever else mitmproxy answers itself (a request it
cannot parse, a bad Content-Length, an upstream it cannot reach, an attempt that
timed out, a body over its own limit), the client gets the same status as
OpenAI-shaped JSON (`{"error": {"message", "type", "code"}}`, application/json)
instead of mitmproxy's HTML page, on HTTP/1 and HTTP/2 alike.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from mitmproxy import flow as mitm_flow
from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy import events
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import _http1, _http2

from core.errors import protocol_error
from core.metadata import reached_client

# mitmproxy's own, taken as the patch goes in.
_original: Callable[..., Generator]
_h2_server_event: Callable[..., Generator]
_installed = False


def _handle_protocol_error(
    self: http_layer.HttpStream, event: http_layer.RequestProtocolError | http_layer.ResponseProtocolError
) -> Generator:
    untouched = (
        not isinstance(event, http_layer.ResponseProtocolError)
        or self.client_state in (self.state_errored, self.state_stream_request_body)
        or self.server_state in (self.state_done, self.state_errored)
        or reached_client(self.flow.metadata, self.flow.response is not None and bool(self.flow.response.stream))
    )
    if untouched:
        return (yield from _original(self, event))
    before = self.flow.response  # headers of a body that never arrived whole: not sent to the client
    self.flow.error = mitm_flow.Error(event.message)
    yield http_layer.HttpErrorHook(self.flow)
    if self.flow.error is None and self.flow.response is not None and self.flow.response is not before:
        return (yield from self.send_response())
    # The rest of mitmproxy's own handling, minus the error hook it already ran.
    if (yield from self.check_killed(False)):
        return
    if self.client_state != self.state_errored:
        yield http_layer.SendHttp(event, self.context.client)
    self.server_state = self.state_errored
    self.flow.live = False
    yield http_layer.DropStream(self.stream_id)


def make_error_response(status_code: int, message: str = "") -> bytes:
    """mitmproxy's HTTP/1 error answer (`_http1.make_error_response`), as OpenAI-shaped JSON."""
    error = protocol_error(status_code, message)
    response = http.Response.make(status_code, error.body(), {**error.all_headers(), "connection": "close"})
    return http1.assemble_response(response)


def _h2_server_handle_event(self: _http2.Http2Server, event: events.Event) -> Generator:
    # mitmproxy's HTTP/2 server sends the same HTML page for an exchange that failed before its
    # answer's headers: the JSON error goes out as an ordinary answer instead.
    if not isinstance(event, http_layer.ResponseProtocolError):
        return (yield from _h2_server_event(self, event))
    status = event.code.http_status_code()
    stream_id = event.stream_id
    if (
        status is None
        or self.is_closed(stream_id)
        or not self.is_open_for_us(stream_id)
        or self.h2_conn.streams[stream_id].state_machine.headers_sent
    ):
        return (yield from _h2_server_event(self, event))
    error = protocol_error(status, event.message)
    response = http.Response.make(status, error.body(), error.all_headers())
    response.http_version = "HTTP/2.0"
    yield from _h2_server_event(self, http_layer.ResponseHeaders(stream_id, response, False))
    yield from _h2_server_event(self, http_layer.ResponseData(stream_id, error.body()))
    yield from _h2_server_event(self, http_layer.ResponseEndOfMessage(stream_id))


def install() -> None:
    """Once per process; later calls change nothing. addons/patches.py installs it, with the others."""
    global _original, _h2_server_event, _installed
    if _installed:
        return
    _original = http_layer.HttpStream.handle_protocol_error
    _h2_server_event = _http2.Http2Server._handle_event
    # Patches replace methods of mitmproxy's classes, which mypy allows no assignment to.
    http_layer.HttpStream.handle_protocol_error = _handle_protocol_error  # type: ignore[method-assign]
    _http2.Http2Server._handle_event = _h2_server_handle_event  # type: ignore[method-assign]
    # A module function, looked up by name each time _http1's server answers an error itself.
    _http1.make_error_response = make_error_response
    _installed = True


class Recovery:
    """No hooks: its patch is installed before the addons load, by addons/patches.py."""
