"""Captured flows: the snapshot becomes a typed record (decoded, parsed, truncated); tees keep stream bytes."""

from __future__ import annotations

import gzip
import json

import pytest

from core.bodies import sse_usage
from core.prices import Price, PriceTable
from core.records import CapturedFlow, StreamTee, redact

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
