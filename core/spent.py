"""What a response says it used, read on the event loop cheaply enough to settle budgets as it ends.

The record (core/records.py) reads usage in the writer thread, later; budgets cannot wait for
it: the next request must already see this one's spend. A whole body is searched from its end
for its "usage" object; a stream keeps only its last few reads, where the usage event is.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from core.bodies import sse_usage

TAIL_BYTES = 8192
_decoder = json.JSONDecoder()


def json_usage(body: bytes) -> dict[str, Any] | None:
    """The top-level "usage" object of a JSON answer, parsed alone (it comes last in OpenAI's answers)."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    colon = body.find(b":", at + 7)
    if colon < 0:
        return None
    try:
        value, _ = _decoder.raw_decode(body[colon + 1 :].decode("utf-8", "replace").lstrip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class UsageTail:
    """A stream callable that passes each read on and keeps the last TAIL_BYTES or so of them."""

    __slots__ = ("_reads", "_size")

    def __init__(self) -> None:
        self._reads: deque[bytes] = deque()
        self._size = 0

    def __call__(self, data: bytes) -> bytes:
        if data:
            self._reads.append(data)
            self._size += len(data)
            while self._size - len(self._reads[0]) >= TAIL_BYTES:
                self._size -= len(self._reads.popleft())
        return data

    def usage(self) -> dict[str, Any] | None:
        return sse_usage(b"".join(self._reads))
