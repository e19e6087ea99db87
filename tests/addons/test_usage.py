"""Usage: ask upstream for a stream's tokens, and take the usage-only chunk out of what the client gets."""

from __future__ import annotations

import gzip
import json

import pytest
from mitmproxy.test import taddons, tflow, tutils

from addons.capture import Capture
from addons.usage import Usage
from core.metadata import USAGE as METADATA
from core.metadata import UsageInjection
from core.records import StreamTee
from core.usage import MAX_HELD_BYTES, UsageChunkFilter

CHUNK = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n'
LAST = b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
USAGE = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n'
DONE = b"data: [DONE]\n\n"
STREAM = CHUNK + CHUNK + LAST + USAGE + DONE
CLIENT_SEES = CHUNK + CHUNK + LAST + DONE
CHAT = "/v1/chat/completions"


def crlf(events: bytes) -> bytes:
    return events.replace(b"\n", b"\r\n")


def spaced(event: bytes) -> bytes:
    """An event as Python's json.dumps writes it (the fake upstream does): `"usage": null`, `"choices": []`."""
    return b"data: " + json.dumps(json.loads(event[6:])).encode() + b"\n\n"


SPACED = b"".join(spaced(e) for e in (CHUNK, LAST, USAGE)) + DONE
SPACED_CLIENT_SEES = b"".join(spaced(e) for e in (CHUNK, LAST)) + DONE


@pytest.fixture
def usage():
    addon = Usage()
    with taddons.context(addon):
        yield addon


def chat_flow(body: bytes, path: str = CHAT, method: str = "POST", headers=()) -> tflow.HTTPFlow:
    fields = ((b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers)
    return tflow.tflow(req=tutils.treq(method=method.encode(), path=path.encode(), headers=fields, content=body))


def sent(flow: tflow.HTTPFlow):
    return json.loads(flow.request.content)


# --------------------------------------------------------------------------- the request


@pytest.mark.parametrize(
    "request_body, stream_options",
    [
        ({"model": "m", "messages": [], "stream": True}, {"include_usage": True}),
        ({"model": "m", "stream": True, "stream_options": None}, {"include_usage": True}),
        ({"model": "m", "stream": True, "stream_options": {"include_usage": False}}, {"include_usage": True}),
        (
            {"model": "m", "stream": True, "stream_options": {"include_obfuscation": False}},
            {"include_obfuscation": False, "include_usage": True},
        ),
    ],
)
def test_streamed_chat_without_usage_asks_for_it(usage, request_body, stream_options):
    flow = chat_flow(json.dumps(request_body).encode(), headers=((b"accept-encoding", b"gzip, br"),))
    usage.request(flow)
    assert sent(flow) == {**request_body, "stream_options": stream_options}
    assert flow.request.headers["content-length"] == str(len(flow.request.raw_content))
    assert flow.request.headers["accept-encoding"] == "identity"  # the stream is filtered as it passes
    assert flow.metadata[METADATA] == UsageInjection()


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", CHAT, b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'),
        ("POST", CHAT, b'{"model": "m", "stream": false}'),
        ("POST", CHAT, b'{"model": "m", "stream": "true"}'),
        ("POST", CHAT, b'{"model": "m", "messages": []}'),
        ("POST", CHAT, b'{"model": "m", "stream": true, "stream_options": "yes"}'),
        ("POST", CHAT, b'{"model": "m", "stream": true,'),  # bad JSON: upstream's 400 reaches the client
        ("POST", CHAT, b'["stream", true]'),
        ("POST", CHAT, b""),
        ("POST", "/v1/completions", b'{"model": "m", "prompt": "x", "stream": true}'),
        ("POST", "/v1/responses", b'{"model": "m", "input": "x", "stream": true}'),
        ("GET", CHAT, b'{"model": "m", "stream": true}'),
    ],
)
def test_other_requests_are_left_alone(usage, method, path, body):
    flow = chat_flow(body, path=path, method=method)
    usage.request(flow)
    assert flow.request.raw_content == body
    assert "accept-encoding" not in flow.request.headers
    assert METADATA not in flow.metadata


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions?api-version=2024-10-21", "/openai/deployments/gpt4/chat/completions"]
)
def test_azure_style_chat_paths_count(usage, path):
    flow = chat_flow(b'{"messages": [], "stream": true}', path=path)
    usage.request(flow)
    assert sent(flow)["stream_options"] == {"include_usage": True}


def test_client_formatting_is_kept_when_only_the_option_is_added(usage):
    body = b' {\n  "model": "m",\n  "messages": [{"role": "user", "content": "caf\\u00e9 \xe2\x98\x95"}],\n  "stream": true\n}'
    flow = chat_flow(body)
    usage.request(flow)
    assert flow.request.content == b' {"stream_options":{"include_usage":true},' + body[2:]
    assert sent(flow)["messages"][0]["content"] == "café ☕"


def test_rewritten_body_keeps_non_ascii_text_readable(usage):
    flow = chat_flow(
        json.dumps(
            {"messages": [{"content": "café"}], "stream": True, "stream_options": {}}, ensure_ascii=False
        ).encode()
    )
    usage.request(flow)
    assert "café".encode() in flow.request.content and sent(flow)["stream_options"] == {"include_usage": True}


def test_a_compressed_request_body_is_rewritten_and_compressed_again(usage):
    body = gzip.compress(b'{"model": "m", "messages": [], "stream": true}')
    flow = chat_flow(body, headers=((b"content-encoding", b"gzip"),))
    usage.request(flow)
    assert gzip.decompress(flow.request.raw_content) == flow.request.content
    assert sent(flow)["stream_options"] == {"include_usage": True}
    assert flow.request.headers["content-length"] == str(len(flow.request.raw_content))


def test_an_unreadable_encoding_is_left_alone(usage):
    body = b"not gzip at all"
    flow = chat_flow(body, headers=((b"content-encoding", b"gzip"),))
    usage.request(flow)
    assert flow.request.raw_content == body and METADATA not in flow.metadata


def test_a_request_answered_locally_is_left_alone(usage):
    flow = chat_flow(b'{"model": "m", "stream": true}')
    flow.response = tutils.tresp(status_code=401)
    usage.request(flow)
    assert METADATA not in flow.metadata


# --------------------------------------------------------------------------- the stream filter


def feed(pieces: list[bytes]) -> list[list[bytes]]:
    """What the filter hands on for each read, then for the end."""
    chunk_filter = UsageChunkFilter()
    return [chunk_filter(piece) for piece in pieces] + [chunk_filter(b"")]


def received(outputs: list[list[bytes]]) -> bytes:
    assert all(chunk for output in outputs for chunk in output), "an empty chunk ends a chunked response"
    return b"".join(chunk for output in outputs for chunk in output)


STREAMS = {
    "lf": (STREAM, CLIENT_SEES),
    "crlf": (crlf(STREAM), crlf(CLIENT_SEES)),
    "spaced json": (SPACED, SPACED_CLIENT_SEES),
    "no usage event": (CLIENT_SEES, CLIENT_SEES),
    "usage beside choices": (CHUNK.replace(b'"usage":null', b'"usage":{"total_tokens":3}') + DONE,) * 2,
    "azure filter results": (b'data: {"choices":[],"prompt_filter_results":[]}\n\n' + CHUNK + DONE,) * 2,
    "named events": (b"event: chunk\n" + CHUNK + b"event: usage\n" + USAGE + DONE, b"event: chunk\n" + CHUNK + DONE),
}


@pytest.mark.parametrize("stream, expected", STREAMS.values(), ids=STREAMS.keys())
def test_filter_drops_only_the_usage_event_wherever_reads_split(stream, expected):
    assert received(feed([stream])) == expected
    for cut in range(1, len(stream)):
        assert received(feed([stream[:cut], stream[cut:]])) == expected, f"split at byte {cut}"


@pytest.mark.parametrize("stream, usage_event", [(STREAM, USAGE), (crlf(STREAM), crlf(USAGE))], ids=["lf", "crlf"])
def test_filter_hands_on_every_complete_event_at_once(stream, usage_event):
    # One byte per read: after each read the client has every event that has ended, but the usage one.
    separator = b"\r\n\r\n" if b"\r\n" in stream else b"\n\n"
    chunk_filter, out = UsageChunkFilter(), b""
    for i in range(1, len(stream) + 1):
        out += b"".join(chunk_filter(stream[i - 1 : i]))
        last_end = stream.rfind(separator, 0, i)
        ended = stream[: last_end + len(separator)] if last_end >= 0 else b""
        assert out == ended.replace(usage_event, b""), f"after byte {i}"
    assert chunk_filter(b"") == []


def test_filter_flushes_an_unterminated_last_event():
    assert received(feed([CHUNK + b"data: [DONE]"])) == CHUNK + b"data: [DONE]"
    assert received(feed([CHUNK + USAGE.rstrip()])) == CHUNK


def test_filter_does_not_hold_a_long_unfinished_event():
    long_event = b'data: {"choices":[{"delta":{"content":"' + b"x" * MAX_HELD_BYTES
    outputs = feed([CHUNK + long_event, b'"}}],"usage":null}\n\n' + USAGE + DONE])
    assert outputs[0] == [CHUNK + long_event]
    assert received(outputs) == CHUNK + long_event + b'"}}],"usage":null}\n\n' + DONE


# --------------------------------------------------------------------------- the response


def sse_response(body: bytes = b"", status: int = 200, encoding: bytes | None = None):
    headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
    if encoding:
        headers.append((b"content-encoding", encoding))
    return tutils.tresp(status_code=status, headers=tuple(headers), content=body)


def injected_flow(usage: Usage, response) -> tflow.HTTPFlow:
    flow = chat_flow(b'{"model": "m", "messages": [], "stream": true}')
    usage.request(flow)
    flow.response = response
    return flow


def test_an_asked_for_stream_is_filtered_and_capture_tees_what_upstream_sent(usage):
    flow = injected_flow(usage, sse_response())
    usage.responseheaders(flow)
    assert isinstance(flow.response.stream, UsageChunkFilter)
    Capture().responseheaders(flow)  # next in the addon chain
    tee = flow.response.stream
    assert isinstance(tee, StreamTee) and isinstance(tee.inner, UsageChunkFilter)
    client = [tee(STREAM[:100]), tee(STREAM[100:]), tee(b"")]
    assert received(client) == CLIENT_SEES
    assert b"".join(tee.chunks) == STREAM and tee.ended_at is not None


@pytest.mark.parametrize(
    "response, asked",
    [
        (sse_response(), False),
        (sse_response(status=429), True),
        (tutils.tresp(), True),
        (sse_response(encoding=b"gzip"), True),
    ],
    ids=["nothing injected", "error status", "not a stream", "compressed anyway"],
)
def test_other_responses_are_not_filtered(usage, response, asked):
    flow = injected_flow(usage, response) if asked else chat_flow(b'{"stream": true}')
    flow.response = response
    usage.responseheaders(flow)
    assert not flow.response.stream


@pytest.mark.parametrize("encoding", [None, b"gzip"])
def test_a_stream_that_arrived_whole_loses_its_usage_event_too(usage, encoding):
    raw = gzip.compress(STREAM) if encoding else STREAM
    flow = injected_flow(usage, sse_response(encoding=encoding))
    flow.response.raw_content = raw
    usage.response(flow)
    assert flow.response.content == CLIENT_SEES
    assert flow.response.headers["content-length"] == str(len(flow.response.raw_content))
    assert flow.metadata[METADATA].upstream_body == raw  # capture records what upstream sent


def test_a_flow_recovered_in_the_error_hook_is_filtered(usage):
    recovered = injected_flow(usage, sse_response(STREAM))
    failed = injected_flow(usage, sse_response(STREAM))
    failed.error = tflow.terr()
    usage.error(recovered)
    usage.error(failed)
    assert recovered.response.content == CLIENT_SEES
    assert failed.response.content == STREAM


def test_a_streamed_response_is_not_filtered_again(usage):
    flow = injected_flow(usage, sse_response(STREAM))
    flow.response.stream = UsageChunkFilter()
    usage.response(flow)
    assert flow.response.content == STREAM and flow.metadata[METADATA].upstream_body is None
