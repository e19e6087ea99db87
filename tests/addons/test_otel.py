"""The OpenTelemetry addon's spans, read from the SDK's in-memory exporter (no proxy, no collector)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from mitmproxy.connection import ConnectionState
from mitmproxy.test import tflow, tutils
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from addons.otel import Otel
from config import ROOT, OtelSettings
from core.metadata import AccessVerdict, KeyUse, RequestedModel
from core.records import AttemptLog
from core.routing import Dialect, Group, RouteTable, Upstream
from core.state import ProxyState

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
UPSTREAM_KEY = "sk-live-upstream-secret-0123456789abcdef"
CLIENT_KEY = "kr-client-secret-abcdef0123456789"
AZURE = Group(2, Upstream(2, "az", "https://az.example.com", Dialect.AZURE), "east")
OPENAI = Group(1, Upstream(1, "oai", None), "main")


@pytest.fixture
def traced() -> Iterator[tuple[Otel, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    state = ProxyState()
    state.table = RouteTable([OPENAI, AZURE])
    addon = Otel(OtelSettings(endpoint="http://127.0.0.1:9"), state, SimpleSpanProcessor(exporter))
    addon.running()
    yield addon, exporter
    addon.done()


def chat_flow(traceparent: str | None = None, stream: bool = False):
    flow = tflow.tflow()
    flow.request.path = "/v1/chat/completions"
    flow.request.headers["authorization"] = f"Bearer {CLIENT_KEY}"
    if traceparent:
        flow.request.headers["traceparent"] = traceparent
        flow.request.headers["tracestate"] = "vendor=x"
    flow.request.content = json.dumps({"model": "gpt-4o", "messages": [], "stream": stream}).encode()
    flow.metadata[AccessVerdict.KEY] = AccessVerdict(client_id=4, client_name="alice", key_id=9)
    flow.metadata[RequestedModel.KEY] = RequestedModel("gpt-4o", "body")
    return flow


def send_first(flow, group: Group = AZURE, key_id: int = 3) -> KeyUse:
    """What the key pool's request hook leaves: the first attempt, begun."""
    start = flow.request.timestamp_start
    attempt = AttemptLog(1, key_id=key_id, started_at=start, upstream_id=group.upstream.id, group_id=group.id)
    use = flow.metadata[KeyUse.KEY] = KeyUse(attempts=[attempt], key_id=key_id, group_id=group.id)
    use.requested_model = "gpt-4o"
    return use


def answer(flow, status: int = 200, body: bytes | None = None, content_type: bytes = b"application/json") -> None:
    if body is None:
        body = json.dumps(
            {"id": "c", "model": "gpt-4o-2024-08-06", "choices": [],
             "usage": {"prompt_tokens": 12, "completion_tokens": 5}}
        ).encode()  # fmt: skip
    flow.response = tutils.tresp(status_code=status, headers=((b"content-type", content_type),), content=body)


def by_kind(spans: tuple[ReadableSpan, ...]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    (request,) = [s for s in spans if s.kind == SpanKind.SERVER]
    return request, [s for s in spans if s.kind == SpanKind.CLIENT]


def test_a_request_is_a_span_continuing_the_clients_and_its_attempt_a_child_named_upstream(traced):
    addon, exporter = traced
    flow = chat_flow(f"00-{TRACE}-{CLIENT_SPAN}-01")
    use = send_first(flow)
    addon.request(flow)

    attempt_span = use.attempts[0].span_id
    assert attempt_span is not None
    assert flow.request.headers.get_all("traceparent") == [f"00-{TRACE}-{attempt_span}-01"]
    assert flow.request.headers["tracestate"] == "vendor=x"  # passed on as it came
    answer(flow)
    use.attempts[0].status, use.attempts[0].duration_ms = 200, 20.0
    addon.response(flow)

    request, (attempt,) = by_kind(exporter.get_finished_spans())
    assert f"{request.context.trace_id:032x}" == TRACE == f"{attempt.context.trace_id:032x}"
    assert request.parent is not None and f"{request.parent.span_id:016x}" == CLIENT_SPAN and request.parent.is_remote
    assert attempt.parent is not None and attempt.parent.span_id == request.context.span_id
    assert f"{attempt.context.span_id:016x}" == attempt_span
    assert request.context.trace_state.get("vendor") == "x"
    assert request.name == attempt.name == "chat gpt-4o"
    assert dict(request.attributes or {}) == {
        "http.request.method": "GET",  # tflow's
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "keyrotor.flow_id": flow.id,
        "keyrotor.attempts": 1,
        "keyrotor.stream": False,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 5,
        "gen_ai.provider.name": "azure.ai.openai",
        "gen_ai.system": "azure.ai.openai",
        "keyrotor.group.name": "az/east",
        "keyrotor.group.id": 2,
        "keyrotor.upstream.name": "az",
        "keyrotor.upstream.id": 2,
        "keyrotor.key.id": 3,
        "keyrotor.client.id": 4,
        "keyrotor.client.name": "alice",
        "keyrotor.client_key.id": 9,
    }
    assert attempt.attributes is not None and attempt.attributes["keyrotor.attempt"] == 1
    assert request.status.status_code == StatusCode.UNSET
    assert request.end_time is not None and request.start_time is not None and request.end_time >= request.start_time


def test_a_client_without_a_traceparent_starts_a_trace_and_one_not_sampled_is_traced_all_the_same(traced):
    addon, exporter = traced
    fresh = chat_flow()
    use = send_first(fresh, OPENAI)
    addon.request(fresh)
    answer(fresh)
    addon.response(fresh)
    request, (attempt,) = by_kind(exporter.get_finished_spans())
    assert request.parent is None and f"{request.context.trace_id:032x}" != TRACE
    assert attempt.attributes is not None and attempt.attributes["gen_ai.provider.name"] == "openai"
    sent = fresh.request.headers["traceparent"]
    assert sent == f"00-{request.context.trace_id:032x}-{use.attempts[0].span_id}-01"

    exporter.clear()
    unsampled = chat_flow(f"00-{TRACE}-{CLIENT_SPAN}-00")
    use = send_first(unsampled)
    addon.request(unsampled)
    assert unsampled.request.headers["traceparent"] == f"00-{TRACE}-{use.attempts[0].span_id}-00"
    answer(unsampled)
    addon.response(unsampled)
    # A client cannot hide its requests from the operator's traces; its flag goes on upstream as it came.
    request, (attempt,) = by_kind(exporter.get_finished_spans())
    assert f"{request.context.trace_id:032x}" == TRACE and request.context.trace_flags.sampled
    assert f"{attempt.context.span_id:016x}" == use.attempts[0].span_id


def test_a_refused_request_is_one_span_with_keyrotors_error_code_and_nothing_sent_upstream(traced):
    addon, exporter = traced
    flow = chat_flow(f"00-{TRACE}-{CLIENT_SPAN}-01")
    flow.metadata[AccessVerdict.KEY] = AccessVerdict(rejected="invalid_api_key", masked="kr-c…6789")
    flow.response = tutils.tresp(status_code=401, headers=((b"x-keyrotor-error", b"invalid_api_key"),))
    addon.request(flow)
    assert flow.request.headers["traceparent"] == f"00-{TRACE}-{CLIENT_SPAN}-01"  # the client's, untouched
    addon.response(flow)
    (request,) = exporter.get_finished_spans()
    assert request.attributes is not None
    assert request.attributes["error.type"] == request.attributes["keyrotor.error_code"] == "invalid_api_key"
    assert request.attributes["keyrotor.attempts"] == 0 and request.status.status_code == StatusCode.UNSET


def test_a_flow_that_reports_a_response_then_an_error_is_one_set_of_spans(traced):
    addon, exporter = traced
    flow = chat_flow()
    send_first(flow)
    addon.request(flow)
    answer(flow)
    addon.response(flow)
    flow.error = tflow.terr("Client disconnected.")
    addon.error(flow)
    assert len(exporter.get_finished_spans()) == 2


def test_a_stream_is_metered_and_its_last_chunk_gives_the_usage(traced):
    addon, exporter = traced
    flow = chat_flow(stream=True)
    send_first(flow)
    addon.request(flow)
    flow.response = tutils.tresp(headers=((b"content-type", b"text/event-stream"),), content=None)
    addon.responseheaders(flow)
    assert callable(flow.response.stream)
    events = [
        b'data: {"model":"gpt-4o-s","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n',
        b'data: {"model":"gpt-4o-s","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":3}}\n\n',
        b"data: [DONE]\n\n",
        b"",
    ]
    assert [flow.response.stream(e) for e in events] == events  # passed on unchanged
    addon.response(flow)
    request, _ = by_kind(exporter.get_finished_spans())
    assert request.attributes is not None
    assert (request.attributes["gen_ai.usage.input_tokens"], request.attributes["gen_ai.usage.output_tokens"]) == (8, 3)
    assert request.attributes["gen_ai.response.model"] == "gpt-4o-s" and request.attributes["keyrotor.stream"]


def test_flows_still_open_when_the_proxy_stops_are_exported_as_stopped():
    exporter = InMemorySpanExporter()
    addon = Otel(OtelSettings(endpoint="http://127.0.0.1:9"), ProxyState(), SimpleSpanProcessor(exporter))
    addon.running()
    flow = chat_flow()
    addon.request(flow)
    addon.done()
    (request,) = exporter.get_finished_spans()
    assert request.attributes is not None and request.attributes["keyrotor.error_code"] == "stopped"
    assert request.status.status_code == StatusCode.ERROR


def test_no_span_attribute_holds_a_key_value(traced):
    addon, exporter = traced
    flow = chat_flow(f"00-{TRACE}-{CLIENT_SPAN}-01")
    use = send_first(flow)
    addon.request(flow)
    flow.request.headers["authorization"] = f"Bearer {UPSTREAM_KEY}"  # as the bytes leave
    use.attempts[0].status, use.attempts[0].error = None, f"Server connection failed for {UPSTREAM_KEY}"
    flow.error = tflow.terr(f"upstream said {UPSTREAM_KEY}")
    addon.error(flow)
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    text = repr([(s.name, dict(s.attributes or {}), s.status.description, s.events) for s in spans])
    for secret in (UPSTREAM_KEY, CLIENT_KEY, UPSTREAM_KEY[-12:], CLIENT_KEY[-12:]):
        assert secret not in text


@pytest.mark.parametrize("endpoint", ["", "http://127.0.0.1:4318"])
def test_the_addon_is_in_the_chain_only_when_an_endpoint_is_set(endpoint):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYROTOR_")}
    env |= {"KEYROTOR_OTEL_ENDPOINT": endpoint, "KEYROTOR_CONFIG": str(ROOT / "config.toml"), "PYTHONPATH": str(ROOT)}
    script = (
        "from addons import keyrotor\n"
        "from addons.chain import Chain\n"
        "chain = Chain(keyrotor.addons)\n"
        "hooks = [m.__qualname__ for h in vars(chain).values() if callable(h) for c in h.__closure__ or ()"
        " if isinstance(c.cell_contents, tuple) for m in c.cell_contents]\n"
        "print([type(a).__name__ for a in keyrotor.addons]); print(hooks)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    names, hooks = result.stdout.splitlines()[-2:]
    assert ("'Otel'" in names) == bool(endpoint)
    assert ("Otel." in hooks) == bool(endpoint) and "Capture.response" in hooks  # the hooks, as the chain calls them


def test_an_answer_that_reached_nobody_is_a_client_that_left(traced):
    addon, exporter = traced
    flow = chat_flow()
    send_first(flow)
    addon.request(flow)
    answer(flow)  # upstream answered, after a retry the client did not wait for
    flow.client_conn.state = ConnectionState.CLOSED
    addon.response(flow)
    request, _ = by_kind(exporter.get_finished_spans())
    assert request.attributes is not None and "http.response.status_code" not in request.attributes
    assert request.attributes["keyrotor.error_code"] == "client_disconnected"
    assert request.status.status_code == StatusCode.ERROR
    assert request.attributes["gen_ai.usage.output_tokens"] == 5  # spent all the same
