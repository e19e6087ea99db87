"""Asking upstream for a stream's token usage, and taking the answer out of what the client gets.

OpenAI reports a stream's tokens only when the request says `stream_options.include_usage`:
then every chunk carries `"usage": null` and one extra chunk with no choices carries the
usage, just before `data: [DONE]`. Clients that did not ask index `choices[0]` on every
chunk, so for them the option is added on the way up and that extra chunk is taken out on
the way down. Capture still records what upstream sent, usage chunk included.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

CHAT_COMPLETIONS = "/chat/completions"
INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'
OPENS_AN_OBJECT = re.compile(rb"[ \t\r\n]*\{")
EVENT_END = re.compile(rb"\n\r?\n")  # a blank line: LF LF or CRLF CRLF (and the mixed forms)
# The usage-only event is small: an unfinished event longer than this is something else
# and goes on without waiting for its end.
MAX_HELD_BYTES = 64 * 1024


def with_usage_requested(body: bytes) -> bytes | None:
    """The chat request body to send instead, asking for usage; None when it needs no change.

    Bodies that are not a JSON object, not streamed, already asking for usage, or with a
    `stream_options` upstream would reject anyway stay as they are.
    """
    try:
        request = json.loads(body)
    except ValueError:
        return None  # upstream answers the client with its own 400
    if not isinstance(request, dict) or request.get("stream") is not True:
        return None
    if "stream_options" not in request and OPENS_AN_OBJECT.match(body):
        # The common case: insert the option and keep the client's bytes as they were.
        brace = body.index(b"{") + 1
        return body[:brace] + INCLUDE_USAGE + body[brace:]
    options = request.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    request["stream_options"] = {**options, "include_usage": True}
    try:
        return json.dumps(request, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: keep it escaped
        return json.dumps(request).encode()


def events_end(buffer: bytes) -> int:
    """Length of the complete events at the start of `buffer` (0: not even one)."""
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def split_events(block: bytes) -> Iterator[bytes]:
    """Each event of `block` with its blank line; what follows the last one comes last."""
    start = 0
    for end in EVENT_END.finditer(block):
        yield block[start : end.end()]
        start = end.end()
    if start < len(block):
        yield block[start:]


def may_hold_usage(events: bytes) -> bool:
    # Once usage is asked for, every chunk says `"usage": null`; only a usage object is worth parsing.
    return events.count(b'"usage"') > events.count(b'"usage":null') + events.count(b'"usage": null')


def is_usage_only(event: bytes) -> bool:
    """A `data:` event whose JSON has no choices and a usage object."""
    data = b"\n".join(line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:"))
    try:
        payload: Any = json.loads(data)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("choices") == [] and isinstance(payload.get("usage"), dict)


def without_usage_events(events: bytes) -> bytes:
    if not may_hold_usage(events):
        return events
    return b"".join(e for e in split_events(events) if not (may_hold_usage(e) and is_usage_only(e)))


class EventFilter:
    """A `flow.response.stream` callable: passes an event stream on, each complete event through `transform`.

    It gets TCP reads, not events. The complete events of each read go on at once; only an
    unfinished last event waits for the rest of its bytes. It returns a list because an empty
    bytes chunk would end a chunked response early.
    """

    def __init__(self, transform: Callable[[bytes], bytes]) -> None:
        self._transform = transform
        self._held = b""

    def __call__(self, data: bytes) -> list[bytes]:
        if not data:  # the end: whatever is left, even an event without its blank line
            rest, self._held = self._held, b""
            rest = self._transform(rest) if rest else rest
            return [rest] if rest else []
        buffer = self._held + data if self._held else data
        end = events_end(buffer)
        if len(buffer) - end > MAX_HELD_BYTES:
            end = len(buffer)
        self._held = buffer[end:]
        complete = self._transform(buffer[:end]) if end else b""
        return [complete] if complete else []


class UsageChunkFilter(EventFilter):
    """Passes an event stream on without its usage-only event."""

    def __init__(self) -> None:
        super().__init__(without_usage_events)


StreamCallable = Callable[[bytes], "bytes | Iterable[bytes]"]


def chained(first: StreamCallable | None, then: StreamCallable) -> StreamCallable:
    """A stream callable that hands what `first` makes of each read to `then` (first may be None)."""
    if first is None:
        return then

    def both(data: bytes) -> list[bytes]:
        out = first(data)
        pieces = [out] if isinstance(out, bytes) else list(out)
        result = []
        for piece in pieces:
            if piece:
                made = then(piece)
                result += [made] if isinstance(made, bytes) else list(made)
        if not data:  # the end reaches `then` too, after whatever `first` still had
            made = then(b"")
            result += [made] if isinstance(made, bytes) else list(made)
        return [r for r in result if r]

    return both
