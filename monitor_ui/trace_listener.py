"""The trace listener: its own port, serving trace images and nothing else (docs/traces.md).

    GET /api/img?traceid=ID   the trace's image, and the fetch recorded (address, user agent,
                              headers, delay after the trace's request was sent)

It is a tiny HTTP/1.1 server (asyncio streams and h11, one request per connection), not the UI
app with routes hidden: no login, no cookie, no other path exists on it, so it is safe to
expose to the internet for relays to reach. Every request counts against its address's
trace.ip_rpm first (429 beyond it); a path other than /api/img, a missing, malformed or unknown
trace id gets 404 after at most one read-only query: only a known id leads to a write, and at
most core.traces.MAX_FETCHES_PER_TRACE fetches are kept per trace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h11

from config import Settings
from core import traces as core_traces
from core.addresses import Network, client_address, parse_networks
from storage import db
from storage import traces as trace_store

log = logging.getLogger(__name__)
MAX_REQUEST_HEAD = 16_384  # request line and headers
READ_SECONDS = 10.0  # to receive a request's head
TEXT = "text/plain; charset=utf-8"


class TraceListener:
    """Serves trace images on (host, port) until closed."""

    def __init__(
        self, db_path: Path, host: str, port: int, per_minute: int, trusted_proxies: tuple[Network, ...] = ()
    ) -> None:
        self.db_path = db_path
        self.host = host
        self.port = port
        self.trusted = trusted_proxies
        self.limiter = core_traces.AddressLimiter(per_minute)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; OSError when the address is taken or cannot be bound."""
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=MAX_REQUEST_HEAD)
        log.info("trace listener on %s:%s", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        try:
            try:
                async with asyncio.timeout(READ_SECONDS):
                    request = await _read_head(conn, reader)
            except (TimeoutError, h11.RemoteProtocolError):
                request = None
            if request is None:
                if conn.their_state is not h11.CLOSED and conn.our_state is h11.IDLE:
                    await _send(writer, conn, 400, b"Bad request.\n", TEXT)
                return
            status, body, content_type = await self._answer(request, peer[0] if peer else None)
            await _send(writer, conn, status, b"" if request.method == b"HEAD" else body, content_type)
        except (ConnectionError, h11.LocalProtocolError):
            pass
        except Exception:
            log.exception("trace listener: a request failed")
        finally:
            writer.close()

    async def _answer(self, request: h11.Request, peer: str | None) -> tuple[int, bytes, str]:
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers]
        forwarded = [v for n, v in headers if n == "x-forwarded-for"]
        address = client_address(peer, forwarded, self.trusted) or "unknown"
        if not self.limiter.allow(address, time.monotonic()):
            return 429, b"Too many requests from this address.\n", TEXT
        target = urlsplit(request.target.decode("latin-1"))
        if target.path != core_traces.IMAGE_PATH:
            return 404, b"Not found.\n", TEXT
        if request.method not in (b"GET", b"HEAD"):
            return 405, b"Only GET.\n", TEXT
        ids = parse_qs(target.query).get("traceid", [])
        if len(ids) != 1 or not core_traces.valid_trace_id(ids[0]):
            return 404, b"Not found.\n", TEXT
        at = time.time()
        recorded = await asyncio.to_thread(self._record, ids[0], address, headers, at)
        if not recorded:
            return 404, b"Not found.\n", TEXT
        return 200, core_traces.IMAGE, "image/png"

    def _record(self, trace_id: str, address: str, headers: list[tuple[str, str]], at: float) -> bool:
        """Whether `trace_id` is a trace: looked up read-only; only then a write (within the trace's fill)."""
        reader = db.connect(self.db_path, readonly=True)
        try:
            found = trace_store.known(reader, trace_id)
        finally:
            reader.close()
        if found is None:
            return False
        writer = db.connect(self.db_path)
        try:
            trace_store.record_fetch(writer, found[0], found[1], address, headers, at)
        finally:
            writer.close()
        return True


async def _read_head(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(MAX_REQUEST_HEAD)
            conn.receive_data(data)
            if not data:
                return None
            continue
        return event if isinstance(event, h11.Request) else None


async def _send(
    writer: asyncio.StreamWriter, conn: h11.Connection, status: int, body: bytes, content_type: str
) -> None:
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
        ("connection", "close"),
    ]
    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    if body:
        writer.write(conn.send(h11.Data(data=body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


def listener_for(settings: Settings) -> TraceListener:
    """The listener trace.host, trace.port and trace.ip_rpm describe; behind ui.trusted_proxies, it reads
    the fetcher's address from X-Forwarded-For as the UI does."""
    trace = settings.trace
    return TraceListener(
        settings.storage_path, trace.host, trace.port, trace.ip_rpm, parse_networks(settings.ui.trusted_proxies)
    )
