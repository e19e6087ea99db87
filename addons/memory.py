"""Memory that large bodies took goes back to the system once their flows end.

Measured with bench/upload_memory.py (8 concurrent uploads of 99 MiB, authenticated, under
proxy.max_body_bytes): the proxy went from 92 MB idle to 1.3–1.5 GB after each burst, and
stayed there. Two causes, neither a reference keyrotor keeps:
- a finished flow sits in reference cycles (mitmproxy's flow, layer and connection objects
  point at each other), freed only by Python's cyclic garbage collector, which runs on
  allocations of new objects: an idle proxy keeps the bodies of its last flows, and flows
  that lived long enough to reach the oldest generation wait for its rare full collections;
- glibc's allocator keeps freed memory for reuse: its mmap threshold rises (up to 32 MB)
  as large blocks are freed, so the pieces of a body growing as it arrives land in the
  heap, and freed heap pages between live ones are not given back.
(A third, smaller one was keyrotor's: the upstream watch's sweep kept the last flow it had
looked at in its coroutine's frame, with its bodies, until the next exchange came.)
So the allocator is told once to map blocks of MMAP_THRESHOLD_BYTES and more on their own
(given back as they are freed), and RELIEF_DELAY_SECONDS after a flow with a body of
LARGE_BODY_BYTES or more ends, one full collection runs and glibc returns its free pages
(malloc_trim). Ordinary traffic (small bodies) never triggers either; a burst of large flows
triggers one relief per delay, not one per flow. After the change: 91 MB idle, 1.8 GB at
the peak, 95 MB after each burst (bench/README.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from typing import Any

from mitmproxy import http

log = logging.getLogger(__name__)

LARGE_BODY_BYTES = 8 * 2**20
RELIEF_DELAY_SECONDS = 1.0
MMAP_THRESHOLD_BYTES = 4 * 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _glibc() -> Any:
    """glibc, when the process runs on it (mallopt and malloc_trim); None elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    return libc


def body_size(flow: http.HTTPFlow) -> int:
    """The larger of the flow's two bodies as they are held (0 for a body that was streamed through)."""
    request = len(flow.request.raw_content or b"")
    response = flow.response
    held = 0 if response is None or response.stream else len(response.raw_content or b"")
    return max(request, held)


class Memory:
    def __init__(self) -> None:
        self._libc = _glibc()
        self._relief: asyncio.TimerHandle | None = None
        self.reliefs = 0

    def running(self) -> None:
        if self._libc is not None:
            # A fixed threshold also stops glibc from raising it as large blocks are freed.
            self._libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)

    def done(self) -> None:
        if self._relief is not None:
            self._relief.cancel()
            self._relief = None

    def response(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def _ended(self, flow: http.HTTPFlow) -> None:
        if self._relief is not None or body_size(flow) < LARGE_BODY_BYTES:
            return
        # Later, not now: the flow is still referenced until mitmproxy's layers are done with it.
        self._relief = asyncio.get_running_loop().call_later(RELIEF_DELAY_SECONDS, self.relieve)

    def relieve(self) -> None:
        """One full collection, then glibc's free pages back to the system."""
        self._relief = None
        started = time.perf_counter()
        collected = gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        self.reliefs += 1
        log.debug("memory relief: %d objects collected in %.1f ms", collected, (time.perf_counter() - started) * 1000)
