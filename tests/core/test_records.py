"""Captured flows: the snapshot becomes a typed record (decoded, parsed, truncated); tees keep stream bytes."""

from __future__ import annotations

import base64
import gzip
import json

import pytest

from core.bodies import sse_usage
from core.prices import Price, PriceTable
from core.records import CapturedFlow, StreamTee, WebSocketMessage, redact

SSE = (
    b'data: {"choices":[{"delta":{"content":"Hi"}}],"usage":null}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n'
    b"data: [DONE]\n\n"
)


def captured(**overrides) -> CapturedFlow:
    fields = dict(
        flow_id="f1",
        started_at=100.0,
        method="POST",
        path="/v1/chat/completions",
        client_addr="127.0.0.1",
        request_fields=((b"Authorization", b"Bearer kr-secret"), (b"content-type", b"application/json")),
        request_body=b'{"model": "gpt-4o-mini", "messages": []}',
        request_encoding=None,
        client_key_id=1,
        upstream_key_id=2,
        body_mode="full",
        max_body_bytes=10,
        status=200,
        first_byte_at=100.5,
        ended_at=101.0,
        response_fields=((b"content-type", b"application/json"), (b"set-cookie", b"session=abc")),
        response_body=b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}',
    )
    return CapturedFlow(**{**fields, **overrides})


def test_row_from_a_plain_response():
    row = captured().to_record()
    assert (row.model, row.stream, row.status, row.duration_ms) == ("gpt-4o-mini", 0, 200, 1000.0)
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (3, 4, 7)
    assert (row.client_key_id, row.upstream_key_id, row.attempts) == (1, 2, 1)
    assert row.request_headers == [["Authorization", "[redacted]"], ["content-type", "application/json"]]
    assert row.response_headers[1] == ["set-cookie", "[redacted]"]


def test_row_from_a_streamed_response():
    row = captured(
        is_sse=True,
        response_body=None,
        response_chunks=[SSE[:30], SSE[30:]],
        chunk_times=[(100.5, 30), (100.75, len(SSE) - 30)],
    ).to_record()
    assert row.stream == 1 and row.response_body == SSE.decode()
    assert (row.prompt_tokens, row.total_tokens) == (9, 11)
    assert row.chunk_times == [[0.0, 30], [250.0, len(SSE) - 30]]


def test_a_stream_its_client_left_keeps_the_tokens_keyrotor_counted():
    cut = SSE[: SSE.index(b'data: {"choices":[]')]  # left before the usage chunk
    counted = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    prices = PriceTable({"gpt-4o-mini": Price(input=1.0, output=2.0)})
    left = captured(is_sse=True, response_body=None, response_chunks=[cut], counted_usage=counted, prices=prices)
    row = left.to_record()
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (5, 1, 6)
    assert row.cost == pytest.approx((5 * 1.0 + 1 * 2.0) / 1e6)
    whole = captured(is_sse=True, response_body=None, response_chunks=[SSE], counted_usage=counted).to_record()
    assert whole.total_tokens == 11  # upstream's own usage, when it came, is what the row keeps


def test_compressed_bodies_are_stored_decoded():
    body = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}'
    row = captured(response_body=gzip.compress(body), response_encoding="gzip").to_record()
    assert row.response_body == body.decode() and row.total_tokens == 2


@pytest.mark.parametrize(
    "mode, stored, truncated",
    [("full", '{"model": "gpt-4o-mini", "messages": []}', 0), ("truncated", '{"model": ', 1), ("none", None, 0)],
)
def test_body_modes(mode, stored, truncated):
    row = captured(body_mode=mode).to_record()
    assert (row.request_body, row.request_body_truncated) == (stored, truncated)
    assert row.request_body_size == 40


def test_binary_and_odd_bodies_do_not_break_the_row():
    row = captured(request_body=b"\xff\xfe\x00binary", response_body=b"[1, 2]").to_record()
    assert row.model is None and row.total_tokens is None and "binary" in row.request_body


@pytest.mark.parametrize(
    "model, cost",
    [
        ("gpt-4o-mini", (3 * 0.15 + 4 * 0.60) / 1e6),
        ("gpt-4o-mini-2024-07-18", (3 * 0.15 + 4 * 0.60) / 1e6),
        ("llama-3-70b", None),
    ],
)
def test_cost_of_a_row_from_its_model_and_usage(model, cost):
    prices = PriceTable({"gpt-4o-mini": Price(0.15, 0.60)})
    row = captured(request_body=json.dumps({"model": model}).encode(), prices=prices).to_record()
    assert row.cost == (pytest.approx(cost) if cost else None)
    assert row.total_tokens == 7  # an unknown model still counts its tokens


def test_rows_without_usage_or_prices_have_no_cost():
    assert (
        captured(
            response_body=b'{"error": {"code": "rate_limit_exceeded"}}',
            prices=PriceTable({"gpt-4o-mini": Price(0.15, 0.60)}),
        )
        .to_record()
        .cost
        is None
    )
    assert captured().to_record().cost is None


def test_sse_usage_ignores_chunks_without_usage():
    assert sse_usage(b'data: {"usage": null}\n\ndata: [DONE]\n\n') is None


def test_redact_is_case_insensitive():
    assert redact(((b"API-Key", b"x"), (b"Cookie", b"y"), (b"X-Other", b"z"))) == [
        ["API-Key", "[redacted]"],
        ["Cookie", "[redacted]"],
        ["X-Other", "z"],
    ]


def test_tee_passes_bytes_through_unchanged():
    tee = StreamTee(first_byte=0.0)
    assert [tee(b"data: 1\n\n"), tee(b"data: 2\n\n"), tee(b"")] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert tee.chunks == [b"data: 1\n\n", b"data: 2\n\n"] and tee.ended_at is not None


RESPONSES_SSE = (
    b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1","usage":null}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_1","usage":'
    b'{"input_tokens":13,"input_tokens_details":{"cached_tokens":3},"output_tokens":15,'
    b'"output_tokens_details":{"reasoning_tokens":4},"total_tokens":28}}}\n\n'
)


def test_a_responses_stream_has_its_tokens_cost_and_details():
    prices = PriceTable({"gpt-5": Price(1.25, 10.0, cached_input=0.125)})
    row = captured(
        path="/v1/responses",
        request_body=b'{"model": "gpt-5", "input": "hi", "stream": true}',
        is_sse=True,
        response_body=None,
        response_chunks=[RESPONSES_SSE],
        prices=prices,
    ).to_record()
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (13, 15, 28)
    assert (row.cached_tokens, row.reasoning_tokens) == (3, 4)
    assert row.cost == pytest.approx((10 * 1.25 + 3 * 0.125 + 15 * 10.0) / 1e6)


def test_a_binary_answer_is_kept_as_bytes_with_its_type_not_as_text():
    audio = b"ID3\x04\x00\xff\xfb\x90\x64" * 50
    row = captured(
        path="/v1/audio/speech",
        request_body=b'{"model": "tts-1", "input": "Hello there", "voice": "alloy"}',
        response_fields=((b"content-type", b"audio/mpeg"),),
        response_body=audio,
        body_mode="full",
        prices=PriceTable({"tts-1": Price(per_million_characters=15.0)}),
    ).to_record()
    assert row.response_body is None and row.response_body_size == len(audio)
    assert (row.response_body_type, row.response_body_bytes) == ("audio/mpeg", audio)
    assert row.cost == pytest.approx(11 * 15.0 / 1e6)
    assert row.request_body_type is None  # the JSON request stays text


BOUNDARY = b"----kr-boundary"
UPLOAD = b"RIFF\x00\x00WAVEfmt \xff\xfe" * 100


def multipart(*parts: tuple[str, bytes, str | None]) -> bytes:
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += b"--" + BOUNDARY + b"\r\ncontent-disposition: " + disposition.encode() + b"\r\n"
        body += (b"content-type: audio/wav\r\n" if filename else b"") + b"\r\n" + value + b"\r\n"
    return body + b"--" + BOUNDARY + b"--\r\n"


def test_an_audio_upload_keeps_its_fields_as_text_and_its_file_as_bytes():
    body = multipart(("model", b"whisper-1", None), ("file", UPLOAD, "speech.wav"), ("language", b"en", None))
    row = captured(
        path="/v1/audio/transcriptions",
        request_fields=((b"content-type", b"multipart/form-data; boundary=" + BOUNDARY),),
        request_body=body,
        body_mode="full",
        response_body=b'{"text": "hello", "usage": {"type": "duration", "seconds": 90}}',
        prices=PriceTable({"whisper-1": Price(per_minute=0.006)}),
    ).to_record()
    assert row.model == "whisper-1" and row.cost == pytest.approx(0.009)
    form = json.loads(row.request_body)
    assert form == {
        "model": "whisper-1",
        "file": {"filename": "speech.wav", "content_type": "audio/wav", "size": len(UPLOAD)},
        "language": "en",
    }
    assert "RIFF" not in row.request_body and "\ufffd" not in row.request_body
    assert (row.request_body_type, row.request_body_bytes) == ("audio/wav", UPLOAD)
    assert row.request_body_size == len(body)


def test_body_modes_apply_to_bytes_too():
    fields = dict(response_fields=((b"content-type", b"audio/mpeg"),), response_body=b"\xff" * 50)
    assert captured(body_mode="none", **fields).to_record().response_body_bytes is None
    row = captured(body_mode="truncated", **fields).to_record()
    assert (row.response_body_bytes, row.response_body_truncated) == (b"\xff" * 10, True)


def test_a_generated_images_base64_leaves_the_text_and_is_kept_as_bytes():
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    answer = {"created": 1, "data": [{"b64_json": base64.b64encode(png).decode()}] * 2, "usage": {"input_tokens": 3}}
    row = captured(
        path="/v1/images/generations",
        request_body=b'{"model": "dall-e-3", "prompt": "a cat", "n": 2, "size": "1024x1792", "quality": "hd"}',
        response_body=json.dumps(answer).encode(),
        body_mode="full",
        max_body_bytes=10_000,
        prices=PriceTable({"dall-e-3": Price(per_image={"hd 1024x1792": 0.12})}),
    ).to_record()
    assert base64.b64encode(png).decode() not in row.response_body
    assert json.loads(row.response_body)["data"][0]["b64_json"].startswith("[48 bytes of base64 image")
    assert (row.response_body_type, row.response_body_bytes) == ("image/png", png)
    assert row.cost == pytest.approx(0.24)


def test_a_websocket_sessions_messages_and_usage():
    done = {
        "type": "response.done",
        "response": {"usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}},
    }
    messages = [
        WebSocketMessage(100.25, True, True, b'{"type": "response.create"}'),
        WebSocketMessage(100.5, False, True, json.dumps(done).encode()),
        WebSocketMessage(100.75, True, False, b"\x00\x01audio"),
        WebSocketMessage(101.0, False, True, json.dumps(done).encode()),
    ]
    row = captured(
        method="GET",
        path="/v1/realtime?model=gpt-realtime",
        request_body=b"",
        status=101,
        response_body=b"",
        websocket_messages=messages,
        body_mode="full",
        max_body_bytes=10_000,
        prices=PriceTable({"gpt-realtime": Price(4.0, 16.0)}),
    ).to_record()
    assert row.model == "gpt-realtime"
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (20, 10, 30)
    assert row.cost == pytest.approx((20 * 4 + 10 * 16) / 1e6)
    assert [m[:4] for m in row.websocket_messages] == [
        [250.0, "client", "text", 27],
        [500.0, "server", "text", len(json.dumps(done))],
        [750.0, "client", "binary", 7],
        [1000.0, "server", "text", len(json.dumps(done))],
    ]
    assert row.websocket_messages[0][4] == '{"type": "response.create"}' and row.websocket_messages[2][4] is None


def test_repeated_form_fields_are_a_list_and_the_file_is_the_upload():
    body = multipart(
        ("timestamp_granularities[]", b"word", None),
        ("timestamp_granularities[]", b"segment", None),
        ("file", UPLOAD, "speech.wav"),
        ("model", b"whisper-1", None),
    )
    row = captured(
        path="/v1/audio/transcriptions",
        request_fields=((b"content-type", b"multipart/form-data; boundary=" + BOUNDARY),),
        request_body=body,
        body_mode="full",
    ).to_record()
    assert json.loads(row.request_body)["timestamp_granularities[]"] == ["word", "segment"]
    assert (row.model, row.request_body_bytes) == ("whisper-1", UPLOAD)


CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is <b>2+2</b>?"}]}'
ANSWER = b'{"choices": [{"message": {"content": "4"}}], "usage": {"total_tokens": 7}}'


@pytest.mark.parametrize(
    "mode, overrides, previews",
    [
        ("full", {"response_body": ANSWER}, ("What is <b>2+2</b>?", "4")),
        ("truncated", {"response_body": ANSWER}, ("What is <b>2+2</b>?", "4")),  # read before truncation
        ("none", {"response_body": ANSWER}, (None, None)),  # no bodies kept: no previews either
        ("full", {"is_sse": True, "response_body": None, "response_chunks": [SSE[:30], SSE[30:]]}, (None, "Hi")),
    ],
)
def test_previews_are_read_from_the_bodies_as_captured(mode, overrides, previews):
    body = CHAT if "is_sse" not in overrides else b'{"model": "gpt-4o-mini", "messages": []}'
    row = captured(body_mode=mode, max_body_bytes=10, request_body=body, **overrides).to_record()
    assert (row.prompt_preview, row.answer_preview) == (previews[0] if body == CHAT else None, previews[1])


def test_labels_go_from_the_capture_to_the_record():
    row = captured(tags="a,b", session="s-1").to_record()
    assert (row.tags, row.session) == ("a,b", "s-1")
