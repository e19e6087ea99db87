"""What a response says it used, read on the event loop cheaply enough to settle budgets as it ends.

The record (core/records.py) reads usage in the writer thread, later; budgets cannot wait for
it: the next request must already see this one's spend. A whole body is searched from its end
for its "usage" object; a stream's usage event is read from its last few reads. A stream that
ends without one (its client left first) is counted from all the reads that passed.
"""

from __future__ import annotations

import json
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


class StreamMeter:
    """A stream callable that passes each read on and keeps them all (references, not copies): the usage
    event at its end when upstream sent one, else the deltas keyrotor counts itself (core/tokens.py)."""

    __slots__ = ("_reads", "ended")

    def __init__(self) -> None:
        self._reads: list[bytes] = []
        self.ended = False  # the whole stream passed

    def __call__(self, data: bytes) -> bytes:
        if data:
            self._reads.append(data)
        else:
            self.ended = True
        return data

    def passed(self) -> bytes:
        return b"".join(self._reads)

    def usage(self) -> dict[str, Any] | None:
        """Upstream's usage, from the last reads (where its usage event is)."""
        return sse_usage(self.tail())

    def tail(self) -> bytes:
        """The last reads, at least TAIL_BYTES of them when the stream had that many."""
        tail, size = [], 0
        for read in reversed(self._reads):
            tail.append(read)
            size += len(read)
            if size >= TAIL_BYTES:
                break
        return b"".join(reversed(tail))
