"""A local fake of an OpenTelemetry Collector's OTLP/HTTP receiver, for the tracing tests.

It accepts POST /v1/traces with a protobuf ExportTraceServiceRequest (gzip or not), decodes it
with opentelemetry-proto's own classes and keeps every span and the raw bytes it received. It
can also hang (hold each export without answering until it stops) or refuse with a status.
It listens on a free loopback port.
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


@dataclass
class ReceivedSpan:
    """One exported span, its ids as lower-case hex (as a traceparent writes them)."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int  # Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT, ...
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int  # Status.STATUS_CODE_UNSET / _OK / _ERROR
    status_message: str
    trace_state: str
    resource: dict[str, Any]

    @property
    def server(self) -> bool:
        return self.kind == Span.SPAN_KIND_SERVER

    @property
    def client(self) -> bool:
        return self.kind == Span.SPAN_KIND_CLIENT


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class FakeCollector:
    """POST /v1/traces → spans, decoded; `hang` holds each export unanswered, `status` answers with it."""

    def __init__(self, hang: bool = False, status: int = 200) -> None:
        self.hang = hang
        self.status = status
        self.bodies: list[bytes] = []  # each export as it arrived (decompressed)
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.spans: list[ReceivedSpan] = []
        self.held = 0  # exports received and not answered (hang)
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Self:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                collector._received(self.path, dict(self.headers.items()), body)
                if collector.hang:
                    with collector._lock:
                        collector.held += 1
                    collector._release.wait()
                    return
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(collector.status)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-collector", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _received(self, path: str, headers: dict[str, str], body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: value_of(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes={a.key: value_of(a.value) for a in span.attributes},
                            status_code=span.status.code,
                            status_message=span.status.message,
                            trace_state=span.trace_state,
                            resource=resource,
                        )
                    )
        with self._lock:
            self.paths.append(path)
            self.headers.append(headers)
            self.bodies.append(body)
            self.spans.extend(spans)

    def spans_of(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def all_bytes(self) -> bytes:
        with self._lock:
            return b"".join(self.bodies)
