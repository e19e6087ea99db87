"""What happened: every flow becomes one record, streamed responses teed without buffering.

Hooks only take a snapshot (core.records.CapturedFlow) and queue it; decoding, JSON
parsing and truncation run in the writer thread, never on the event loop.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.websocket import WebSocketData

from config import BODY_MODES, ConfigError, Settings, checked_options, default_of, names_in, option_source, read_prices
from core.classify import is_client_side
from core.metadata import (
    FIRST_BYTE_AT,
    RECORDED,
    AccessVerdict,
    ClientRequest,
    ClientSent,
    CountedUsage,
    FlowLabels,
    KeyUse,
    RequestedModel,
    UsageInjection,
)
from core.ports import RecordSink
from core.prices import PriceTable
from core.records import CapturedFlow, Retention, StreamTee, WebSocketMessage
from core.request_model import renamed_top_model

log = logging.getLogger(__name__)

STOPPED = "keyrotor stopped before the request finished (proxy.stop_grace_seconds ran out)"
CUT = "the client closed its connection before the answer reached it: it got nothing"
FAILED_EXCHANGE = 502  # mitmproxy's answer to an exchange that failed before any byte reached the client
UNFINISHED_PRUNE_AT = 10_000
# A session that ended so is no error: closed normally, going away, or with no code given.
NORMAL_CLOSE_CODES = frozenset({None, 1000, 1001, 1005})


class Capture:
    def __init__(self, defaults: Settings | None = None, records: RecordSink | None = None) -> None:
        self._defaults = defaults
        self._tees: dict[str, StreamTee] = {}  # by flow.id: flow.metadata gets deep-copied by mitmweb
        # Flows seen and not yet recorded: recorded at done() if the proxy stops before they end.
        self._unfinished: dict[str, http.HTTPFlow] = {}
        self._records = records  # the runtime's writer (addons/runtime.py), which stops after this addon's done()
        self._writer: RecordSink | None = None  # the sink while the proxy runs
        self._prices = PriceTable()
        self._max_bytes = 0  # capture_max_gb, in bytes

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "capture_bodies",
            str,
            default_of(self._defaults, "capture.bodies"),
            f"Bodies to store: {', '.join(BODY_MODES)}.",
            choices=BODY_MODES,
        )
        loader.add_option(
            "capture_max_body_bytes",
            int,
            default_of(self._defaults, "capture.max_body_bytes"),
            "With capture_bodies=truncated, bytes kept of each body.",
        )
        loader.add_option(
            "capture_keep_days",
            int,
            default_of(self._defaults, "capture.keep_days"),
            "Flows older than this many days are deleted (0: never).",
        )
        loader.add_option(
            "capture_max_rows",
            int,
            default_of(self._defaults, "capture.max_rows"),
            "Beyond this many flows the oldest are deleted (0: no limit).",
        )
        loader.add_option(
            "capture_max_gb",
            str,  # mitmproxy's --set parses no floats; read in configure
            f"{default_of(self._defaults, 'capture.max_gb'):g}",
            "Beyond this many GB (10^9 bytes, decimals allowed) of database the oldest flows are deleted"
            " (0: no limit).",
        )
        loader.add_option(
            "capture_backlog_mb",
            int,
            default_of(self._defaults, "capture.backlog_mb"),
            "Flows kept in memory while the database refuses writes, in MB; beyond it the oldest are dropped"
            " (and counted in /metrics).",
        )
        loader.add_option(
            "capture_prices",
            str,
            default_of(self._defaults, "capture.prices"),
            "TOML file of model prices (USD per million input and output tokens) for cost estimates.",
        )

    def configure(self, updated: set[str]) -> None:
        try:
            checked = checked_options(ctx.options, updated, names_in("capture"))
            if "capture.prices" in checked:
                self._prices = read_prices(checked["capture.prices"], option_source("capture_prices"))
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        if "capture.max_gb" in checked:
            self._max_bytes = int(checked["capture.max_gb"] * 10**9)
        if self._writer:
            self._configure_writer(self._writer)

    def _retention(self) -> Retention:
        return Retention(
            keep_days=ctx.options.capture_keep_days,
            max_rows=ctx.options.capture_max_rows,
            max_bytes=self._max_bytes,
        )

    def running(self) -> None:
        self._writer = self._records
        if self._writer:
            self._configure_writer(self._writer)

    def _configure_writer(self, writer: RecordSink) -> None:
        writer.retention = self._retention()
        writer.backlog_bytes = ctx.options.capture_backlog_mb * 2**20

    def done(self) -> None:
        # Requests the proxy is stopping under (proxy.stop_grace_seconds ran out): a row
        # each, with what had arrived, rather than nothing.
        for flow in list(self._unfinished.values()):
            self._record(flow, error=STOPPED)
        self._writer = None  # the runtime stops the writer next, after writing every queued row

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if len(self._unfinished) >= UNFINISHED_PRUNE_AT:  # flows that ended with neither hook (none should)
            self._unfinished = {k: f for k, f in self._unfinished.items() if f.live}
        self._unfinished[flow.id] = flow

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or "text/event-stream" not in response.headers.get("content-type", ""):
            return
        inner = response.stream if callable(response.stream) else None
        tee = StreamTee(first_byte=response.timestamp_start or time.time(), inner=inner)
        self._tees[flow.id] = tee
        response.stream = tee

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None:
            return  # an accepted WebSocket session: recorded when it ends, with its messages
        self._record(flow)

    @staticmethod
    def _cut(flow: http.HTTPFlow) -> bool:
        """Whether the client left before any answer reached it: while upstream was asked, or while the
        key pool retried or failed over. An answer still to go out whole, or mitmproxy's 502, goes to
        nobody then."""
        if flow.client_conn.connected or flow.websocket is not None:  # a session's row is written as it ends
            return False
        response = flow.response
        if response is None:
            return flow.error is not None and not is_client_side(flow.error.msg)
        return flow.error is None and not response.stream

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.error is None and flow.response is not None and flow.response.raw_content is None:
            return  # recovered with a retried stream, fed to the client next: recorded at its end
        self._record(flow)

    def _record(self, flow: http.HTTPFlow, error: str | None = None) -> None:
        self._unfinished.pop(flow.id, None)
        # A flow can report both response and error (client gone after the last byte): one row.
        if flow.metadata.get(RECORDED) or self._writer is None:
            return
        flow.metadata[RECORDED] = True
        captured = self.snapshot(flow, error)
        if error is None and self._cut(flow):
            # Upstream's answer stays in the row (its tokens were spent); the status is the client's: none.
            captured.status, captured.first_byte_at = None, None
            captured.error = f"{CUT}; {captured.error}" if captured.error else CUT
        self._writer.record(captured)

    def snapshot(self, flow: http.HTTPFlow, error: str | None = None) -> CapturedFlow:
        request = flow.request
        access = AccessVerdict.of(flow.metadata) or AccessVerdict()
        keys = KeyUse.of(flow.metadata) or KeyUse()
        sent = ClientRequest.of(flow.metadata)  # set where upstream was sent another path or model name
        captured = CapturedFlow(
            flow_id=flow.id,
            started_at=request.timestamp_start,
            method=request.method,
            path=request.path if sent is None else sent.path,
            # Whom a trusted proxy forwarded (access.trusted_proxies), else the peer.
            client_addr=access.address or (flow.client_conn.peername[0] if flow.client_conn.peername else None),
            request_fields=request.headers.fields,
            request_body=request.raw_content if sent is None else _as_sent(request, sent),
            request_encoding=request.headers.get("content-encoding"),
            client_key_id=access.key_id,
            client_id=access.client_id,
            refusal=access.rejected,
            upstream_key_id=keys.key_id,
            body_mode=ctx.options.capture_bodies,
            max_body_bytes=ctx.options.capture_max_body_bytes,
            error=error or (flow.error.msg if flow.error else None) or access.reason or keys.refusal,
            attempts=list(keys.attempts),
            upstream_id=keys.upstream_id,
            group_id=keys.group_id,
            fallback_model=keys.fallback_model,
            requested_model=keys.requested_model or _model(flow),
            prices=self._prices,
            replay_of=access.replay_of,
            pin_note=access.pin_note,
        )
        original = ClientSent.of(flow.metadata)
        if original is not None and keys.key_id is not None:  # it went upstream: what changed on the way
            captured.client_path, captured.client_fields = original.path, original.fields
            captured.client_body = original.body
            captured.sent_url = request.url
            if captured.request_body is not request.raw_content:  # the record names the model back
                captured.upstream_body = request.raw_content
        labels = FlowLabels.of(flow.metadata)
        if labels is not None:
            captured.tags, captured.session = ",".join(labels.tags) or None, labels.session
        response = flow.response
        tee = self._tees.pop(flow.id, None)
        if response is None:
            captured.ended_at = flow.error.timestamp if flow.error else time.time()
            if flow.error and not is_client_side(flow.error.msg):
                captured.status = FAILED_EXCHANGE  # what mitmproxy answered the client with
            return captured
        if tee is not None and response.stream is not tee:
            tee = None  # teed an attempt whose answer was replaced by a retry's
        captured.status = response.status_code
        captured.first_byte_at = flow.metadata.get(FIRST_BYTE_AT) or response.timestamp_start
        captured.response_fields = response.headers.fields
        captured.response_encoding = response.headers.get("content-encoding")
        if tee is not None:
            captured.is_sse = True
            captured.response_chunks = tee.chunks
            captured.chunk_times = tee.times
            captured.ended_at = tee.ended_at or response.timestamp_end or time.time()
        else:
            # A stream that arrived whole: a retried attempt's answer (see addons/keypool.py).
            captured.is_sse = "text/event-stream" in response.headers.get("content-type", "")
            # The usage addon may have taken its usage chunk out of what the client got.
            injection = UsageInjection.of(flow.metadata)
            upstream_body = injection.upstream_body if injection else None
            captured.response_body = response.raw_content if upstream_body is None else upstream_body
            captured.ended_at = response.timestamp_end or time.time()
        if flow.websocket is not None:
            self._add_websocket(captured, flow.websocket)
        if flow.error:
            captured.ended_at = flow.error.timestamp
        counted = CountedUsage.of(flow.metadata)  # a stream its client left: the Spend addon counted it
        if counted is not None:
            captured.counted_usage = counted.usage()
            captured.error = f"{captured.error} {counted.note}" if captured.error else counted.note
        return captured

    @staticmethod
    def _add_websocket(captured: CapturedFlow, session: WebSocketData) -> None:
        captured.websocket_messages = [
            WebSocketMessage(m.timestamp, m.from_client, m.is_text, m.content) for m in session.messages
        ]
        captured.ended_at = session.timestamp_end or time.time()
        if session.close_code not in NORMAL_CLOSE_CODES and captured.error is None:
            reason = f": {session.close_reason}" if session.close_reason else ""
            captured.error = f"WebSocket closed with code {session.close_code}{reason}"[:500]


def _as_sent(request: http.Request, sent: ClientRequest) -> bytes | None:
    """The body as the client sent it: an alias renamed for upstream is named back (byte for byte)."""
    body = request.raw_content
    if body and sent.renamed and sent.model and "content-encoding" not in request.headers:
        return renamed_top_model(body, sent.renamed, sent.model)
    return body


def _model(flow: http.HTTPFlow) -> str | None:
    """The model the request names, as the access addon read it (core/request_model.py): the row's
    model and price are the ones the allowlist checked and upstream was asked for."""
    named = RequestedModel.of(flow.metadata)
    return named.model if named is not None else None
