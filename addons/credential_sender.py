"""The pooled key exists only in the bytes that leave for upstream; its echo never gets back in.

mitmweb serialises a flow after every hook (mitmproxy follows each one with its `update`
hook, which mitmweb's view broadcasts on `/updates`) and serves the live flow object to
whoever asks, so a key that sits in `flow.request` between two hooks is shown. The flow
therefore keeps the key pool's placeholder from start to end. This patch of mitmproxy's
HttpStream puts the key into the request's headers only for the instant the upstream
connection turns them into bytes (a synchronous pass: no hook, no other task and no
mitmweb request can run in it), and replaces the key with the placeholder in whatever
upstream sends back (headers, body, streamed or not) before the flow, and so any hook,
view or record, holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from mitmproxy import http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import events
from mitmproxy.proxy.layers import http as http_layer

from core.bodies import STREAM_ENCODINGS, StreamDecoder
from core.credentials import EchoFilter, credential_from, encoded_echo, with_credential

_handle_event: Callable[..., Generator]  # mitmproxy's own, taken as the patch goes in
_installed = False
_active: CredentialSender | None = None


class CredentialSender:
    """The key pool fills `outgoing` (flow.id → key value; never in flow.metadata); the patch, installed
    by addons/patches.py, sends them. It has no hooks: nothing in mitmproxy's chain runs for it per flow.

    A retry goes out with httpx (core/failover.py); when its stream is fed to the client through
    mitmproxy's stream (addons/retry_stream.py), the key pool leaves `answering[flow.id]` = (key value,
    placeholder), and the patch replaces that key's echo in the stream as it does a first attempt's."""

    def __init__(self) -> None:
        self.outgoing: dict[str, str] = {}
        self.answering: dict[str, tuple[str, str]] = {}
        self.installed = False

    def load(self, loader: Loader) -> None:
        global _active
        _active = self
        self.installed = _installed  # without the patch, the key pool puts the key on the flow itself

    def done(self) -> None:
        global _active
        if _active is self:
            _active = None


def install() -> None:
    """Once per process, before addons/upstream_watch.py's, which wraps it (addons/patches.py keeps the order)."""
    global _handle_event, _installed
    if _installed:
        return
    _handle_event = http_layer.HttpStream._handle_event
    # A patch replaces a method of mitmproxy's class, which mypy allows no assignment to.
    http_layer.HttpStream._handle_event = _handle_event_with_key  # type: ignore[method-assign]
    _installed = True


def _handle_event_with_key(self: http_layer.HttpStream, event: events.Event) -> Generator:
    if _active is not None and _active.answering and type(event) is http_layer.ResponseHeaders:
        _answered_with(self, _active.answering.pop(self.flow.id, None))
    echo: EchoFilter | None = self.__dict__.get("_keyrotor_echo")
    if echo is not None:
        if isinstance(event, http_layer.ResponseEndOfMessage):
            decoder: StreamDecoder | None = self.__dict__.get("_keyrotor_decoder")
            held = echo.feed(decoder.flush()) if decoder is not None else b""
            # The tail kept back in case the key went on in the next read.
            if held := held + echo.flush():
                yield from _handle_event(self, http_layer.ResponseData(self.stream_id, held))
            _finish_buffered(self, echo)
        else:
            event = _without_echo(self, echo, event)
    # The request goes upstream while one of these two is handled (with its body, or without).
    if _active is None or not isinstance(event, http_layer.RequestEndOfMessage | http_layer.RequestHeaders):
        return (yield from _handle_event(self, event))
    commands = _handle_event(self, event)
    reply = None
    while True:
        try:
            command = commands.send(reply)
        except StopIteration as stop:
            return stop.value
        value = None
        if (
            isinstance(command, http_layer.SendHttp)
            and isinstance(command.event, http_layer.RequestHeaders)
            and command.connection is self.context.server
        ):
            value = _active.outgoing.pop(self.flow.id, None)
        if value is None:
            reply = yield command
            continue
        headers = command.event.request.headers
        shown = headers.fields
        stand_in = (credential_from(shown) or "").encode()
        self.__dict__["_keyrotor_echo"] = EchoFilter(value.encode(), stand_in)  # read back the same way, above
        if stand_in:  # the key takes the placeholder's place, in whichever header and form the pool put it
            headers.fields = tuple((name, v.replace(stand_in, value.encode())) for name, v in shown)
        else:
            headers.fields = with_credential(shown, value)
        try:
            # The connection below has turned the head into bytes by the time this resumes.
            reply = yield command
        finally:
            headers.fields = shown


def _answered_with(self: http_layer.HttpStream, key: tuple[str, str] | None) -> None:
    """A retried answer's head, sent with another key than the first attempt's: its echo is looked for now."""
    if key is not None:
        value, stand_in = key
        self.__dict__["_keyrotor_echo"] = EchoFilter(value.encode(), stand_in.encode())
        self.__dict__.pop("_keyrotor_decoder", None)


def _without_echo(self: http_layer.HttpStream, echo: EchoFilter, event: events.Event) -> events.Event:
    """The server's event with the key replaced by the placeholder."""
    if isinstance(event, http_layer.ResponseHeaders):
        event.response.headers.fields = echo.fields(event.response.headers.fields)
        _decode_compressed_stream(self, event.response)
    elif isinstance(event, http_layer.ResponseData):
        decoder: StreamDecoder | None = self.__dict__.get("_keyrotor_decoder")
        if decoder is not None:
            return http_layer.ResponseData(event.stream_id, echo.feed(decoder.feed(event.data)))
        response = self.flow.response
        if response is not None and response.stream and "content-length" in response.headers:
            # Already framed for the client: a replacement of another length would break it.
            echo.replacement = (echo.replacement + b"*" * len(echo.secret))[: len(echo.secret)]
        return http_layer.ResponseData(event.stream_id, echo.feed(event.data))
    return event


def _decode_compressed_stream(self: http_layer.HttpStream, response: http.Response) -> None:
    """An event stream compressed by upstream is decoded as it passes, before any hook sees its head.

    Its key echo could not be found in the compressed bytes, nor could the hooks that read a stream
    (usage, renamed models, capture) read them. The client gets it plain: the stream is re-framed
    (chunked on HTTP/1.1, else up to the connection's end) as its length is no longer upstream's."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in STREAM_ENCODINGS or "text/event-stream" not in response.headers.get("content-type", ""):
        return
    self.__dict__["_keyrotor_decoder"] = StreamDecoder(encoding)
    del response.headers["content-encoding"]
    if "content-length" in response.headers:
        del response.headers["content-length"]
        if self.flow.request.http_version == "HTTP/1.1" and "transfer-encoding" not in response.headers:
            response.headers["transfer-encoding"] = "chunked"


def _finish_buffered(self: http_layer.HttpStream, echo: EchoFilter) -> None:
    """A whole body about to become the flow's: look inside a compressed one too, fix the length."""
    response = self.flow.response
    if response is None or response.stream:
        return
    body = self.response_body_buf
    encoding = response.headers.get("content-encoding", "")
    # Decoded piece by piece to look, and handed on decoded only when it quoted the key.
    if encoding and (plain := encoded_echo(bytes(body), encoding, echo.secret, echo.replacement)) is not None:
        body.clear()
        body += plain
        del response.headers["content-encoding"]
        echo.replaced = True
    if echo.replaced and "content-length" in response.headers:
        response.headers["content-length"] = str(len(body))
