"""The span ids the OpenTelemetry SDK gives the spans addons/otel.py makes: the ones core/telemetry.py
chose as the request went, and named upstream in each attempt's traceparent.

Apart from core/telemetry.py so that only the tracing addon, when it is configured, imports the SDK.
"""

from __future__ import annotations

from opentelemetry.sdk.trace.id_generator import IdGenerator


class ChosenIds(IdGenerator):
    """Gives the SDK, for the span it makes next, the trace id and span id set here just before."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id
