"""Lets an `error` hook answer the client after a failed upstream exchange.

mitmproxy 12 always answers a failed exchange (refused, reset, closed before the
whole response) with its own 502 once the error hooks return. The key pool retries
such an attempt with another key inside its error hook; when it succeeds it sets
`flow.response` and clears `flow.error`, and this patch sends that response
instead of the 502. It is what mitmproxy PR #7999 proposes upstream. Nothing
changes for a response that was already streaming to the client: bytes that
reached the client cannot be taken back.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from mitmproxy import flow as mitm_flow
from mitmproxy.proxy.layers import http as http_layer

from core.metadata import reached_client

_original: Callable[..., Generator]  # mitmproxy's own, taken as the patch goes in
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


def install() -> None:
    """Once per process; later calls change nothing. addons/patches.py installs it, with the others."""
    global _original, _installed
    if _installed:
        return
    _original = http_layer.HttpStream.handle_protocol_error
    # A patch replaces a method of mitmproxy's class, which mypy allows no assignment to.
    http_layer.HttpStream.handle_protocol_error = _handle_protocol_error  # type: ignore[method-assign]
    _installed = True


class Recovery:
    """No hooks: its patch is installed before the addons load, by addons/patches.py."""
