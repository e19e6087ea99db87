"""Trace context and span plans (core/telemetry.py), without a proxy or the OpenTelemetry SDK."""

from __future__ import annotations

import asyncio
import json

import pytest

from core.dispatch import ClientRequest, Plan, route, scope_of
from core.records import AttemptLog
from core.routing import Dialect
from core.telemetry import (
    Finished,
    FlowTrace,
    GroupInfo,
    TraceParent,
    answer_of_body,
    answer_of_events,
    attempt_fields,
    collector_headers,
    operation_of,
    parse_traceparent,
    shown_url,
    spans,
    traces_url,
    with_traceparent,
)
from tests.core.test_dispatch import MODEL, World

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "header, parsed",
    [
        (f"00-{TRACE}-{SPAN}-01", TraceParent(TRACE, SPAN, 1)),
        (f"00-{TRACE}-{SPAN}-00", TraceParent(TRACE, SPAN, 0)),
        (f" 00-{TRACE}-{SPAN}-03 ", TraceParent(TRACE, SPAN, 3)),
        (f"01-{TRACE}-{SPAN}-01-future", TraceParent(TRACE, SPAN, 1)),  # a later version: its known fields
        (f"00-{TRACE}-{SPAN}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is invalid
        (f"00-{'0' * 32}-{SPAN}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE.upper()}-{SPAN}-01", None),  # lower-case hex only
        (f"00-{TRACE[:-1]}-{SPAN}-01", None),
        (f"00-{TRACE}-{SPAN}-1", None),
        ("00-xyz", None),
        ("", None),
        (None, None),
    ],
)
def test_a_traceparent_is_read_as_w3c_trace_context_says(header, parsed):
    assert parse_traceparent(header) == parsed


def test_a_request_continues_the_clients_trace_or_starts_one():
    continued = FlowTrace.begin(f"00-{TRACE}-{SPAN}-01", "vendor=a,other=b")
    assert (continued.trace_id, continued.parent_id, continued.sampled) == (TRACE, SPAN, True)
    assert continued.span_id not in (SPAN, "") and len(continued.span_id) == 16
    assert continued.tracestate == "vendor=a,other=b"
    unsampled = FlowTrace.begin(f"00-{TRACE}-{SPAN}-00", None)
    assert not unsampled.sampled and unsampled.traceparent("1" * 16) == f"00-{TRACE}-{'1' * 16}-00".encode()
    for bad in (None, "garbage", f"00-{'0' * 32}-{SPAN}-01"):
        fresh = FlowTrace.begin(bad, "vendor=a")
        assert fresh.parent_id is None and fresh.sampled and fresh.tracestate is None
        assert len(fresh.trace_id) == 32 and fresh.trace_id != TRACE
    assert FlowTrace.begin(f"00-{TRACE}-{SPAN}-01", "v=" + "x" * 600).tracestate is None  # beyond W3C's limit


def test_the_traceparent_upstream_gets_replaces_the_clients():
    fields = ((b"Traceparent", b"client"), (b"authorization", b"Bearer x"), (b"TRACEPARENT", b"again"))
    assert with_traceparent(fields, b"ours") == ((b"authorization", b"Bearer x"), (b"traceparent", b"ours"))


def test_a_retry_names_its_own_span_in_the_same_trace():
    attempt = AttemptLog(attempt=2, key_id=7, started_at=0.0)
    fields = [(b"authorization", b"Bearer sk"), (b"traceparent", f"00-{TRACE}-{SPAN}-01".encode())]
    sent = dict(attempt_fields(fields, attempt))
    assert attempt.span_id is not None and attempt.span_id != SPAN
    assert sent[b"traceparent"] == f"00-{TRACE}-{attempt.span_id}-01".encode()
    untraced = AttemptLog(attempt=2, key_id=7, started_at=0.0)
    assert attempt_fields([(b"authorization", b"Bearer sk")], untraced) == [(b"authorization", b"Bearer sk")]
    assert untraced.span_id is None


class TracedWorld(World):
    """test_dispatch's world, keeping the headers of each retry it is sent."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[dict[bytes, bytes]] = []

    async def send(self, client, method, url, fields, body, first_token_seconds=0.0):
        self.sent.append(dict(fields))
        return await super().send(client, method, url, fields, body, first_token_seconds)


@pytest.mark.parametrize("traced", [True, False])
def test_failover_gives_each_retry_a_traceparent_only_when_the_request_is_traced(traced):
    world = TracedWorld({"a": 3}, {"a2": ["429"]})  # the first attempt (a1) is sent by the caller
    body = json.dumps({"model": MODEL}).encode()
    routes = route(world.table, MODEL, None)
    assert isinstance(routes, list)
    client_header = f"00-{TRACE}-{SPAN}-01".encode()
    plan = Plan(routes, ClientRequest("POST", "/v1/chat/completions", ((b"traceparent", client_header),), body, MODEL))
    key = world.rotations[1].pool.keys[0]
    use = world.failover.begin(plan.candidates[0], 0, key, None, scope_of(plan.candidates[0], plan))
    if traced:
        use.attempts[0].span_id = SPAN
    asyncio.run(world.failover.retry(None, use, plan, None, "http://up.test"))  # type: ignore[arg-type]

    assert len(world.sent) == 2 and len(use.attempts) == 3
    headers = [sent[b"traceparent"] for sent in world.sent]
    if traced:
        ids = [a.span_id for a in use.attempts[1:]]
        assert headers == [f"00-{TRACE}-{span}-01".encode() for span in ids]
        assert len({SPAN, *ids}) == 3
    else:  # otel off: the client's header goes on as it came
        assert headers == [client_header] * 2 and all(a.span_id is None for a in use.attempts)


@pytest.mark.parametrize(
    "path, operation",
    [
        ("/v1/chat/completions", "chat"),
        ("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", "chat"),
        ("/v1/completions", "text_completion"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/responses", "chat"),
        ("/v1/models", None),
        ("/v1/files/file-abc", None),
    ],
)
def test_the_operation_is_named_as_the_genai_conventions_name_it(path, operation):
    assert operation_of(path) == operation


def test_the_answer_names_its_model_and_usage():
    chat = json.dumps(
        {"id": "c1", "model": "gpt-4o-2024-08-06", "choices": [{"message": {"content": '"model": "decoy"'}}],
         "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}
    ).encode()  # fmt: skip
    assert answer_of_body(chat, False) == ("gpt-4o-2024-08-06", {"prompt_tokens": 11, "completion_tokens": 7,
                                                                 "total_tokens": 18})  # fmt: skip
    embedding = json.dumps({"object": "list", "data": [{"embedding": [0.1] * 2000}], "model": "te-3",
                            "usage": {"prompt_tokens": 3, "total_tokens": 3}}).encode()  # fmt: skip
    assert answer_of_body(embedding, False)[0] == "te-3"
    assert answer_of_body(b"not json", False) == (None, None)
    stream = (
        b'data: {"id":"c","model":"gpt-4o-mini-2024","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
        b'data: {"id":"c","model":"gpt-4o-mini-2024","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}'
        b"\n\ndata: [DONE]\n\n"
    )
    assert answer_of_events(stream) == ("gpt-4o-mini-2024", {"prompt_tokens": 5, "completion_tokens": 2})
    assert answer_of_body(stream, True) == answer_of_events(stream)
    cut = b'data: {"id":"c","model":"gpt-4o-mini-2024","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
    assert answer_of_events(cut) == ("gpt-4o-mini-2024", None)
    responses = (
        b'event: response.completed\ndata: {"type":"response.completed","response":{"model":"gpt-4.1",'
        b'"usage":{"input_tokens":9,"output_tokens":4,"total_tokens":13}}}\n\n'
    )
    model, usage = answer_of_events(responses)
    assert model == "gpt-4.1" and usage is not None and usage["input_tokens"] == 9


def test_a_retried_request_plans_a_span_and_a_child_per_attempt():
    trace = FlowTrace(TRACE, "1111111111111111", SPAN, 1, None)
    attempts = [
        AttemptLog(1, key_id=3, started_at=10.0, status=429, duration_ms=50, upstream_id=1, group_id=1,
                   span_id="2222222222222222"),
        AttemptLog(2, key_id=4, started_at=10.1, status=None, error="upstream timed out: nothing for 30 s",
                   duration_ms=30_000, upstream_id=2, group_id=2, span_id="3333333333333333"),
        AttemptLog(3, key_id=5, started_at=40.2, status=200, duration_ms=100, upstream_id=2, group_id=2,
                   model="gpt-4o-mini", span_id="4444444444444444"),
    ]  # fmt: skip
    groups = {1: GroupInfo("oai/main", "oai", Dialect.OPENAI), 2: GroupInfo("az/east", "az", Dialect.AZURE)}
    done = Finished(
        "flow-1", "POST", "/v1/chat/completions", 9.9, 45.0, 200, client_id=8, client_name="alice",
        client_key_id=12, model="gpt-4o", fallback_model="gpt-4o-mini", response_model="gpt-4o-mini-2024",
        usage={"prompt_tokens": 5, "completion_tokens": 2}, stream=True, attempts=attempts,
    )  # fmt: skip
    request, *tries = spans(done, trace, groups)

    assert (request.name, request.server, request.parent_id, request.span_id) == ("chat gpt-4o", True, SPAN, "1" * 16)
    assert request.error is None and (request.start, request.end) == (9.9, 45.0)
    assert request.attributes["gen_ai.provider.name"] == "azure.ai.openai"  # where the answer came from
    assert request.attributes["keyrotor.fallback_model"] == "gpt-4o-mini"
    assert request.attributes["keyrotor.attempts"] == 3 and request.attributes["keyrotor.client_key.id"] == 12
    assert [t.span_id for t in tries] == ["2" * 16, "3" * 16, "4" * 16]
    assert all(t.parent_id == "1" * 16 and not t.server for t in tries)
    assert [t.name for t in tries] == ["chat gpt-4o", "chat gpt-4o", "chat gpt-4o-mini"]
    assert [t.error for t in tries] == ["429", "timeout", None]
    assert [t.attributes.get("gen_ai.provider.name") for t in tries] == ["openai", "azure.ai.openai"] * 1 + [
        "azure.ai.openai"
    ]
    assert [t.attributes["keyrotor.key.id"] for t in tries] == [3, 4, 5]
    assert [t.attributes.get("keyrotor.group.name") for t in tries] == ["oai/main", "az/east", "az/east"]
    assert tries[0].end == pytest.approx(10.05) and tries[2].end == 45.0  # the answering one lasts the stream
    assert "gen_ai.usage.input_tokens" not in tries[0].attributes
    assert tries[2].attributes["gen_ai.usage.output_tokens"] == 2
    assert tries[2].attributes["gen_ai.response.model"] == "gpt-4o-mini-2024"


@pytest.mark.parametrize(
    "status, code, broken, error, error_type",
    [
        (200, None, False, None, None),
        (403, "model_not_allowed", False, None, "model_not_allowed"),
        (404, None, False, None, "404"),
        (503, "no_upstream_key_available", False, "no_upstream_key_available", "no_upstream_key_available"),
        (200, "client_disconnected", True, "client_disconnected", "client_disconnected"),
        (None, "client_disconnected", True, "client_disconnected", "client_disconnected"),
        (502, "upstream_error", True, "upstream_error", "upstream_error"),
    ],
)
def test_the_request_span_fails_as_an_http_servers_does(status, code, broken, error, error_type):
    done = Finished("f", "POST", "/v1/chat/completions", 1.0, 2.0, status, error_code=code, broken=broken)
    (request,) = spans(done, FlowTrace(TRACE, SPAN), {})
    assert request.error == error and request.attributes.get("error.type") == error_type
    assert request.attributes.get("keyrotor.error_code") == code


def test_names_of_other_requests_hold_no_ids():
    done = Finished("f", "GET", "/v1/files/file-abc123/content?limit=2", 1.0, 2.0, 200)
    (request,) = spans(done, FlowTrace(TRACE, SPAN), {})
    assert request.name == "GET /v1/files/{id}/content" and "gen_ai.operation.name" not in request.attributes


@pytest.mark.parametrize(
    "endpoint, url",
    [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
        ("https://otel.example.com/v1/traces", "https://otel.example.com/v1/traces"),
        ("https://example.com/otlp/traces", "https://example.com/otlp/traces"),
    ],
)
def test_a_collectors_base_url_gets_the_traces_path(endpoint, url):
    assert traces_url(endpoint) == url


def test_a_logged_collector_url_shows_no_password():
    assert shown_url("https://user:pw@otel.example.com:4318/v1/traces") == "https://otel.example.com:4318/v1/traces"
    assert shown_url("http://127.0.0.1:4318/v1/traces") == "http://127.0.0.1:4318/v1/traces"


def test_collector_headers_are_decoded():
    assert collector_headers("Authorization=Bearer%20abc,x-team=blue") == {
        "authorization": "Bearer abc",
        "x-team": "blue",
    }
    assert collector_headers("") == {}
