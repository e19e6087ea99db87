"""OpenTelemetry (docs/otel.md): a span per request and one per upstream attempt, exported over OTLP/HTTP.

addons/keyrotor.py registers this addon only when `otel.endpoint` is set: otherwise none of its
hooks exists in the chain, and a request costs what it did before. The trace ids are chosen as
the request goes (core/telemetry.py): `request` continues the client's traceparent and gives
the first attempt upstream a traceparent naming its own span; core/failover.py gives each retry
its own. When the request ends (a stream's end, the client leaving), its spans are made from
what the flow recorded, with the times it recorded, and handed to the SDK's BatchSpanProcessor,
whose thread exports them: no export runs on the event loop, a collector that is down or hangs
never holds a request, and the queue is bounded (otel.max_queue; beyond it the oldest spans go).
Each proxy worker is its own process with its own exporter.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from mitmproxy import ctx, http
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from config import OtelSettings
from core import telemetry
from core.classify import is_client_side
from core.metadata import AccessVerdict, KeyUse, RequestedModel, UsageInjection
from core.span_ids import ChosenIds
from core.spent import StreamMeter
from core.state import ProxyState
from core.telemetry import Finished, FlowTrace, GroupInfo, SpanPlan
from core.usage import chained

log = logging.getLogger(__name__)

OPEN_PRUNE_AT = 10_000  # flows seen and not ended: those that ended with neither hook are forgotten then
SHUTDOWN_WAIT_SECONDS = 5.0  # the loop waits this long at most, when stopping, for the last export
STOPPED = "stopped"
CLIENT_LEFT = "client_disconnected"
UPSTREAM_FAILED = "upstream_error"
KEYROTOR_ERROR = b"x-keyrotor-error"  # keyrotor's own answers name their error code (core/errors.py)
CONTENT_TYPE = b"content-type"


class Otel:
    """Traces each request and its attempts upstream; exports them from the SDK's own thread."""

    def __init__(self, settings: OtelSettings, state: ProxyState, processor: SpanProcessor | None = None) -> None:
        self._settings = settings
        self.state = state  # the runtime's: which group (and upstream dialect) an attempt went to
        self._processor = processor  # None: a BatchSpanProcessor over the OTLP/HTTP exporter, made in running()
        self._provider: TracerProvider | None = None
        self._tracer: trace_api.Tracer | None = None
        self._ids = ChosenIds()
        self._meters: dict[str, StreamMeter] = {}  # by flow.id: a stream's last reads hold its model and usage
        self._open: dict[str, http.HTTPFlow] = {}  # traced flows not yet ended: ended at done() if still open

    def running(self) -> None:
        if self._tracer is not None:
            return
        settings = self._settings
        processor = self._processor
        if processor is None:
            exporter = OTLPSpanExporter(
                endpoint=telemetry.traces_url(settings.endpoint),
                headers=telemetry.collector_headers(settings.headers),
                timeout=settings.timeout_seconds,
            )
            processor = BatchSpanProcessor(
                exporter,
                max_queue_size=settings.max_queue,
                max_export_batch_size=min(512, settings.max_queue),
                export_timeout_millis=settings.timeout_seconds * 1000,
            )
        # Not the global provider: keyrotor's spans only, whatever else the process runs. Every request is
        # recorded: a client's traceparent says which trace its spans join, not whether the operator sees
        # them (its sampled flag goes on upstream as it came, core/telemetry.py).
        self._provider = TracerProvider(
            sampler=ALWAYS_ON,
            resource=Resource.create(self._resource()),
            id_generator=self._ids,
            shutdown_on_exit=False,  # done() shuts it down, bounded: never at exit behind a hanging collector
        )
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("keyrotor")
        log.info("OpenTelemetry spans go to %s", telemetry.shown_url(telemetry.traces_url(settings.endpoint)))

    def _resource(self) -> dict[str, str | int]:
        """What every span of this process shares: the service, this process, and which worker it is."""
        attributes: dict[str, str | int] = {
            "service.name": self._settings.service_name,
            "service.instance.id": str(uuid.uuid4()),  # one per process: each worker exports its own spans
        }
        options = getattr(ctx, "options", None)  # the runtime's options (absent outside a proxy)
        if options is not None and "proxy_workers" in options and options.proxy_workers > 1:
            attributes["keyrotor.worker"] = options.proxy_worker_index
        return attributes

    def done(self) -> None:
        for flow in list(self._open.values()):
            self._end(flow, stopped=True)
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is None:
            return
        # The processor's shutdown exports what is queued; a collector that hangs holds its thread, not the stop.
        stopping = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
        stopping.start()
        stopping.join(min(SHUTDOWN_WAIT_SECONDS, self._settings.timeout_seconds))

    # ------------------------------------------------------------------ hooks

    def request(self, flow: http.HTTPFlow) -> None:
        """After the key pool chose the first attempt's key: the trace, and the traceparent upstream gets."""
        request = flow.request
        headers = request.headers
        sent = telemetry.header_values(headers.fields, telemetry.TRACEPARENT, telemetry.TRACESTATE)
        trace = flow.metadata[FlowTrace.KEY] = FlowTrace.begin(*sent)
        if len(self._open) >= OPEN_PRUNE_AT:
            self._open = {k: f for k, f in self._open.items() if f.live}
            self._meters = {k: m for k, m in self._meters.items() if k in self._open}
        self._open[flow.id] = flow
        use = KeyUse.of(flow.metadata)
        if flow.response is not None or use is None or not use.attempts:
            return  # answered or refused by keyrotor: nothing goes upstream
        first = use.attempts[-1]
        first.span_id = telemetry.new_span_id()
        headers.fields = telemetry.with_traceparent(headers.fields, trace.traceparent(first.span_id))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not 200 <= response.status_code < 300 or flow.id not in self._open:
            return
        if "text/event-stream" not in response.headers.get("content-type", ""):
            return
        # Before the usage addon's filter (addons/keyrotor.py's order): the usage chunk passes here.
        meter = self._meters[flow.id] = StreamMeter()
        response.stream = chained(response.stream if callable(response.stream) else None, meter)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:  # an accepted WebSocket session ends with websocket_end
            self._end(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.error is None and flow.response is not None and flow.response.raw_content is None:
            return  # recovered with a retried stream, fed to the client next: it ends at its end
        self._end(flow)

    # ------------------------------------------------------------------ spans

    def _end(self, flow: http.HTTPFlow, stopped: bool = False) -> None:
        if self._open.pop(flow.id, None) is None:
            return  # ended already (a flow may report a response and then an error), or never traced
        meter = self._meters.pop(flow.id, None)
        trace = FlowTrace.of(flow.metadata)
        if trace is None or self._tracer is None:
            return
        finished = self._finished(flow, meter, stopped)
        table = self.state.table
        groups = {}
        for attempt in finished.attempts:
            group = table.by_id.get(attempt.group_id) if attempt.group_id is not None else None
            if group is not None:
                groups[group.id] = GroupInfo(group.label, group.upstream.name, group.upstream.dialect)
        for plan in telemetry.spans(finished, trace, groups):
            self._emit(plan, trace)

    def _finished(self, flow: http.HTTPFlow, meter: StreamMeter | None, stopped: bool) -> Finished:
        request, response = flow.request, flow.response
        access = AccessVerdict.of(flow.metadata) or AccessVerdict()
        use = KeyUse.of(flow.metadata) or KeyUse()
        named = RequestedModel.of(flow.metadata)
        finished = Finished(
            flow_id=flow.id,
            method=request.method,
            path=request.path,
            started_at=request.timestamp_start,
            ended_at=time.time(),
            status=None,
            client_id=access.client_id,
            client_name=access.client_name,
            client_key_id=access.key_id,
            model=use.requested_model or (named.model if named is not None else None),
            fallback_model=use.fallback_model,
            attempts=use.attempts,
        )
        code = access.rejected or (use.refusal.partition(":")[0] if use.refusal else None)
        if response is not None:
            finished.status = response.status_code
            finished.ended_at = response.timestamp_end or finished.ended_at
            own_code, content_type = telemetry.header_values(response.headers.fields, KEYROTOR_ERROR, CONTENT_TYPE)
            code = own_code or code
            content_type = content_type or ""
            finished.stream = "text/event-stream" in content_type
            if 200 <= response.status_code < 300:
                self._read_answer(flow, response, meter, content_type, finished)
            if flow.websocket is not None and flow.websocket.timestamp_end:
                finished.ended_at = flow.websocket.timestamp_end
        elif flow.error is not None and not is_client_side(flow.error.msg):
            finished.status = 502  # what mitmproxy answered the client with
            code = code or UPSTREAM_FAILED
        if flow.error is not None:
            finished.ended_at = flow.error.timestamp
            code = code or (CLIENT_LEFT if is_client_side(flow.error.msg) else UPSTREAM_FAILED)
        cut = _cut(flow)
        if cut:  # upstream's answer went to nobody: the client had left (its tokens were spent all the same)
            finished.status, code = None, code or CLIENT_LEFT
        if stopped:
            code = STOPPED
        finished.broken = stopped or cut or flow.error is not None
        finished.error_code = code
        return finished

    @staticmethod
    def _read_answer(
        flow: http.HTTPFlow, response: http.Response, meter: StreamMeter | None, content_type: str, into: Finished
    ) -> None:
        """The model and usage the answer names: a stream's from its last reads, a whole answer's from its body."""
        if meter is not None and response.stream:
            into.response_model, into.usage = telemetry.answer_of_events(meter.tail())
            return
        if "json" not in content_type and not into.stream:
            return  # a file or audio download is not decoded and searched on the loop
        injection = UsageInjection.of(flow.metadata)  # the usage addon may have taken a retried stream's usage out
        try:
            body = injection.upstream_body if injection and injection.upstream_body else response.content
        except ValueError:
            return
        if body:
            into.response_model, into.usage = telemetry.answer_of_body(body, into.stream)

    def _emit(self, plan: SpanPlan, trace: FlowTrace) -> None:
        assert self._tracer is not None
        trace_id = int(trace.trace_id, 16)
        flags = trace_api.TraceFlags(trace.flags & 0xFF)
        state = trace_api.TraceState.from_header([trace.tracestate]) if trace.tracestate else None
        if plan.server:
            parent_id, remote = (int(plan.parent_id, 16), True) if plan.parent_id else (0, False)
        else:
            parent_id, remote = int(trace.span_id, 16), False
        context = Context()  # a root span's: never whatever span is current in the loop
        if parent_id:
            parent = trace_api.SpanContext(trace_id, parent_id, remote, flags, state)
            context = trace_api.set_span_in_context(trace_api.NonRecordingSpan(parent), context)
        self._ids.trace_id, self._ids.span_id = trace_id, int(plan.span_id, 16)
        span = self._tracer.start_span(
            plan.name,
            context=context,
            kind=trace_api.SpanKind.SERVER if plan.server else trace_api.SpanKind.CLIENT,
            attributes=plan.attributes,
            start_time=int(plan.start * 1e9),
        )
        if plan.error is not None:
            span.set_status(trace_api.Status(trace_api.StatusCode.ERROR, plan.error))
        span.end(end_time=int(max(plan.end, plan.start) * 1e9))


def _cut(flow: http.HTTPFlow) -> bool:
    """Whether the client left before any of its answer reached it (as addons/capture.py judges it)."""
    if flow.client_conn.connected or flow.websocket is not None:
        return False
    response = flow.response
    if response is None:
        return flow.error is not None and not is_client_side(flow.error.msg)
    return flow.error is None and not response.stream
