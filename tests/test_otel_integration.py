"""OpenTelemetry end to end: the official openai client → a real mitmproxy running keyrotor with
`otel.endpoint` set → the fake upstream; the spans reach a fake OTLP/HTTP collector
(tests/fake_collector.py), which decodes them with opentelemetry-proto's classes.

Invariants: one SERVER span per request, a child of the client's span when it sent a traceparent;
one CLIENT span per attempt upstream, whose id is the parent id upstream got in its traceparent;
key ids, never key values, anywhere in what is exported; a collector that is down or hangs
never fails or holds a client request.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.conftest import Keyrotor, free_port, wait_for
from tests.fake_collector import FakeCollector, ReceivedSpan
from tests.fake_upstream import FakeAzure, FakeUpstream

GOOD = ["sk-good-otel-aaaaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-otel-bbbbbbbbbbbbbbbbbbbbbbbb0002"]
MESSAGES = [{"role": "user", "content": "Say hello to the collector"}]
COLLECTOR_TOKEN = "collector-token-s3cr3t"
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # the SDK's batch delay, 5 s by default


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as running:
        yield running


def start_traced(kr: Keyrotor, endpoint: str, *keys: str, extra: tuple[str, ...] = ()) -> str:
    """keys in the pool, the client alice, the proxy exporting to `endpoint` (set by flag); alice's key."""
    kr.env.update(FAST_EXPORT)
    return kr.start_serving(*keys, proxy_args=("--set", f"otel.endpoint={endpoint}", *extra))


def client_for(kr: Keyrotor, key: str, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=timeout)


def new_traceparent() -> tuple[str, str, str]:
    """(header, trace id, span id) of a client's own span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def spans_of(collector: FakeCollector, trace_id: str, count: int) -> list[ReceivedSpan]:
    return wait_for(
        lambda: (found := collector.spans_of(trace_id)) and len(found) >= count and found,
        timeout=15,
        what=f"{count} spans of trace {trace_id}",
    )


@dataclass
class Answered:
    """What the client read of its answer: the model, and the usage it asked for."""

    model: str
    prompt_tokens: int
    completion_tokens: int


def ask(client: openai.OpenAI, headers: dict[str, str], streamed: bool) -> Answered:
    if not streamed:
        completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers)
        assert completion.usage is not None
        return Answered(completion.model, completion.usage.prompt_tokens, completion.usage.completion_tokens)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and chunks[0].choices[0].delta is not None
    return Answered(chunks[0].model, usage.prompt_tokens, usage.completion_tokens)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
def test_a_retried_request_is_a_span_with_a_child_per_attempt_continuing_the_clients_trace(
    keyrotor: Keyrotor, upstream: FakeUpstream, collector: FakeCollector, streamed: bool
):
    upstream.set_key(GOOD[0], "ratelimit")  # every request that meets it is retried on the other
    client_key = start_traced(keyrotor, collector.url, *GOOD)
    client = client_for(keyrotor, client_key)

    retried = None
    for _ in range(3):  # round robin: within two requests, one meets the rate-limited key first
        header, trace_id, client_span = new_traceparent()
        start = len(upstream.received)
        completion = ask(client, {"traceparent": header, "tracestate": "vendor=client-state"}, streamed)
        sent = [r for r in upstream.received[start:] if r.path == "/v1/chat/completions"]
        if len(sent) == 2:
            retried = (trace_id, client_span, completion, sent)
            break
    assert retried is not None, "no request met the rate-limited key first"
    trace_id, client_span, completion, sent = retried
    assert [r.key for r in sent] == GOOD

    spans = spans_of(collector, trace_id, 3)
    (request,) = [s for s in spans if s.server]
    attempts = sorted((s for s in spans if s.client), key=lambda s: s.attributes["keyrotor.attempt"])
    assert len(spans) == 3 and len(attempts) == 2
    # The request span continues the client's; each attempt is its child, named upstream.
    assert request.parent_id == client_span
    assert request.trace_state == "vendor=client-state"
    assert request.name == "chat gpt-4o-mini"
    assert all(a.parent_id == request.span_id for a in attempts)
    assert [r.headers["traceparent"] for r in sent] == [f"00-{trace_id}-{a.span_id}-01" for a in attempts]
    assert [r.headers.get("tracestate") for r in sent] == ["vendor=client-state"] * 2
    assert len({request.span_id, *(a.span_id for a in attempts)}) == 3

    first, second = (a.attributes for a in attempts)
    assert (first["http.response.status_code"], second["http.response.status_code"]) == (429, 200)
    assert first["error.type"] == "429" and "error.type" not in second
    assert attempts[0].status_code == 2 and attempts[1].status_code == 0  # ERROR, then UNSET
    assert first["keyrotor.key.id"] != second["keyrotor.key.id"]
    assert {first["keyrotor.key.id"], second["keyrotor.key.id"]} == {1, 2}
    for attributes in (first, second, request.attributes):
        assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
        assert attributes["gen_ai.provider.name"] == attributes["gen_ai.system"] == "openai"
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["keyrotor.group.name"] == "default/default"
    for attributes in (second, request.attributes):
        assert attributes["gen_ai.response.model"] == completion.model
        assert attributes["gen_ai.usage.input_tokens"] == completion.prompt_tokens
        assert attributes["gen_ai.usage.output_tokens"] == completion.completion_tokens
    assert request.attributes["keyrotor.stream"] is streamed
    assert "gen_ai.usage.input_tokens" not in first
    assert request.attributes["keyrotor.client.name"] == "alice"
    assert request.attributes["keyrotor.attempts"] == 2
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["keyrotor.flow_id"] == first["keyrotor.flow_id"] == second["keyrotor.flow_id"]
    assert request.resource["service.name"] == "keyrotor"

    exported = collector.all_bytes()
    for secret in (*GOOD, client_key):
        assert secret.encode() not in exported and secret[-16:].encode() not in exported


def test_a_stream_span_ends_with_the_stream_and_carries_the_usage_of_its_last_chunk(
    keyrotor: Keyrotor, upstream: FakeUpstream, collector: FakeCollector
):
    upstream.stream_chunks, upstream.stream_delay = 6, 0.1
    client_key = start_traced(keyrotor, collector.url, GOOD[0])
    client = client_for(keyrotor, client_key)
    header, trace_id, _ = new_traceparent()

    chunks = []
    first_chunk_ns = 0
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"traceparent": header}
    ):
        first_chunk_ns = first_chunk_ns or time.time_ns()
        chunks.append(chunk)
    assert chunks and all(c.usage is None for c in chunks)  # the client did not ask: usage stayed hidden

    request, attempt = sorted(spans_of(collector, trace_id, 2), key=lambda s: not s.server)
    rows = wait_for(lambda: keyrotor.query("SELECT prompt_tokens, completion_tokens FROM flows"), what="the row")
    assert request.attributes["gen_ai.usage.input_tokens"] == rows[0]["prompt_tokens"] > 0
    assert request.attributes["gen_ai.usage.output_tokens"] == rows[0]["completion_tokens"] > 0
    assert attempt.attributes["gen_ai.usage.output_tokens"] == rows[0]["completion_tokens"]
    assert request.attributes["gen_ai.response.model"] == chunks[0].model
    assert request.attributes["keyrotor.stream"] is True
    # Both end as the stream ends, not when its headers came.
    assert request.end_ns > first_chunk_ns and attempt.end_ns > first_chunk_ns


def test_a_client_that_hangs_up_mid_stream_ends_its_span_then(
    keyrotor: Keyrotor, upstream: FakeUpstream, collector: FakeCollector
):
    upstream.stream_chunks, upstream.stream_delay = 200, 0.1  # twenty seconds of stream
    client_key = start_traced(keyrotor, collector.url, GOOD[0])
    header, trace_id, _ = new_traceparent()
    with httpx.stream(
        "POST",
        f"{keyrotor.base_url}/chat/completions",
        headers={"authorization": f"Bearer {client_key}", "traceparent": header},
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        next(response.iter_raw())
        left_at = time.time_ns()

    (request,) = [s for s in spans_of(collector, trace_id, 2) if s.server]
    assert request.attributes["keyrotor.error_code"] == "client_disconnected"
    assert request.attributes["http.response.status_code"] == 200
    assert request.end_ns < left_at + 10 * 10**9  # ended as it left, not when the twenty seconds were up


@pytest.mark.parametrize("collector_state", ["down", "hanging"])
def test_a_collector_that_is_down_or_hangs_never_holds_a_request(
    keyrotor: Keyrotor, upstream: FakeUpstream, collector_state: str
):
    with FakeCollector(hang=True) as hanging:
        endpoint = hanging.url if collector_state == "hanging" else f"http://127.0.0.1:{closed_port()}"
        extra = (
            *("--set", "otel.timeout_seconds=60", "--set", "otel.max_queue=16"),
            *("--set", f"otel.headers=authorization=Bearer%20{COLLECTOR_TOKEN}"),
        )
        client_key = start_traced(keyrotor, endpoint, GOOD[0], extra=extra)
        client = client_for(keyrotor, client_key, timeout=5)
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        if collector_state == "hanging":
            wait_for(lambda: hanging.held, what="an export held by the collector")
            assert hanging.headers[0]["authorization"] == f"Bearer {COLLECTOR_TOKEN}"
        # Each request's spans are queued while the export thread waits (up to 60 s) on the collector,
        # 16 at most: the queue is bounded, the oldest dropped.
        for _ in range(20):
            assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
        streamed = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        assert [c for c in streamed]
    keyrotor.stop()
    logs = keyrotor.logs()
    assert GOOD[0] not in logs and COLLECTOR_TOKEN not in logs
    if collector_state == "hanging":
        assert "Queue full, dropping Span" in logs


def closed_port() -> int:
    """A loopback port nothing listens on."""
    port = free_port()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return port


def test_each_worker_exports_its_own_spans(keyrotor: Keyrotor, upstream: FakeUpstream, collector: FakeCollector):
    keyrotor.env.update(FAST_EXPORT)
    keyrotor.add_keys(GOOD[0])
    client_key = keyrotor.add_client()
    keyrotor.start_proxy("--workers", "2", "--set", f"otel.endpoint={collector.url}")
    wait_for(lambda: keyrotor.logs().count("listening at") >= 2, 60, what="both workers listening")

    traces = {}
    for _ in range(40):  # a connection each: the kernel spreads them over both workers
        header, trace_id, _ = new_traceparent()
        response = httpx.post(
            f"{keyrotor.base_url}/chat/completions",
            headers={"authorization": f"Bearer {client_key}", "traceparent": header},
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
            timeout=30,
        )
        assert response.status_code == 200
        traces[trace_id] = response
    rows = wait_for(lambda: len(found := keyrotor.query("SELECT worker FROM flows")) >= 40 and found, what="rows")
    served = {r["worker"] for r in rows}
    spans = wait_for(
        lambda: (found := [s for s in collector.spans if s.server]) and len(found) >= 40 and found,
        timeout=20,
        what="a request span per request",
    )
    assert {s.trace_id for s in spans} == set(traces)
    workers = {s.resource["keyrotor.worker"] for s in spans}
    instances = {s.resource["service.instance.id"] for s in spans}
    assert served == {0, 1} and workers == {0, 1} and len(instances) == 2


def test_a_burst_of_clients_each_gets_its_own_trace_and_bad_trace_headers_start_new_ones(
    keyrotor: Keyrotor, upstream: FakeUpstream, collector: FakeCollector
):
    client_key = start_traced(keyrotor, collector.url, *GOOD)
    client = client_for(keyrotor, client_key)
    headers = [new_traceparent() for _ in range(16)]

    def call(header: str) -> str:
        completion = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"traceparent": header}
        )
        return completion.id

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(call, [h for h, _, _ in headers]))
    by_trace = {r.headers["traceparent"].split("-")[1]: r for r in upstream.received if "traceparent" in r.headers}
    for _, trace_id, client_span in headers:
        request, attempt = sorted(spans_of(collector, trace_id, 2), key=lambda s: not s.server)
        assert request.parent_id == client_span and attempt.parent_id == request.span_id
        assert by_trace[trace_id].headers["traceparent"] == f"00-{trace_id}-{attempt.span_id}-01"
        assert len(collector.spans_of(trace_id)) == 2  # nothing of another request's crossed in

    # A malformed traceparent, an all-zero trace id, an oversized tracestate: a new trace each, upstream gets ours.
    for bad in ("garbage", f"00-{'0' * 32}-{'1' * 16}-01", f"00-{'A' * 32}-{'1' * 16}-01"):
        start = len(upstream.received)
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"traceparent": bad, "tracestate": "k=" + "v" * 600}
        )
        sent = upstream.received[start].headers["traceparent"]
        _, trace_id, span_id, flags = sent.split("-")
        assert sent != bad and len(trace_id) == 32 and trace_id != "0" * 32 and flags == "01"
        request, attempt = sorted(spans_of(collector, trace_id, 2), key=lambda s: not s.server)
        assert request.parent_id == "" and request.trace_state == "" and attempt.span_id == span_id


def test_a_failover_from_azure_to_a_relay_names_each_attempts_provider_and_group(
    keyrotor: Keyrotor, upstream: FakeUpstream, collector: FakeCollector
):
    azure_key, relay_key = "0123456789abcdef0123456789abcdef", "sk-good-otel-relay-" + "r" * 20 + "0001"
    with FakeAzure({"prod-gpt4o": "gpt-4o-2024-08-06"}) as azure, FakeUpstream(models={"gpt-4o"}) as relay:
        azure.set_key(azure_key, "invalid")  # revoked: the request moves on to the relay's group
        keyrotor.setup("upstreams", "add", "azure", azure.url, "--dialect", "azure", "--api-version", "2024-10-21")
        keyrotor.setup("upstreams", "add", "relay", relay.url + "/v1")
        keyrotor.setup("groups", "add", "azure/prod", "--priority", "10")
        keyrotor.setup("groups", "add", "relay/cheap", "--priority", "5")
        keyrotor.setup("models", "add", "azure/prod", "gpt-4o", "--as", "prod-gpt4o")
        keyrotor.setup("models", "add", "relay/cheap", "gpt-4o")
        keyrotor.setup("keys", "add", "--group", "azure/prod", input=azure_key + "\n")
        keyrotor.setup("keys", "add", "--group", "relay/cheap", input=relay_key + "\n")
        client_key = start_traced(keyrotor, collector.url)
        header, trace_id, _ = new_traceparent()
        completion = client_for(keyrotor, client_key).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"traceparent": header}
        )
        (to_azure,), (to_relay,) = azure.received, relay.received

    spans = spans_of(collector, trace_id, 3)
    (request,) = [s for s in spans if s.server]
    first, second = sorted((s for s in spans if s.client), key=lambda s: s.attributes["keyrotor.attempt"])
    assert (first.attributes["gen_ai.provider.name"], first.attributes["keyrotor.group.name"]) == (
        "azure.ai.openai",
        "azure/prod",
    )
    assert (second.attributes["gen_ai.provider.name"], second.attributes["keyrotor.group.name"]) == (
        "openai",
        "relay/cheap",
    )
    assert first.attributes["http.response.status_code"] == 401 and first.attributes["error.type"] == "401"
    assert (
        first.attributes["keyrotor.upstream.name"] == "azure" and second.attributes["keyrotor.upstream.name"] == "relay"
    )
    assert to_azure.headers["traceparent"] == f"00-{trace_id}-{first.span_id}-01"
    assert to_relay.headers["traceparent"] == f"00-{trace_id}-{second.span_id}-01"
    assert request.attributes["gen_ai.provider.name"] == "openai"  # the answer came from the relay
    assert request.attributes["gen_ai.response.model"] == completion.model
    exported = collector.all_bytes()
    assert azure_key.encode() not in exported and relay_key.encode() not in exported
