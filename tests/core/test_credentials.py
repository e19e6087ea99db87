"""Credentials: where a key can hide in a request, and taking an echoed key out of what arrives."""

from __future__ import annotations

import gzip

import httpx
import pytest

from core.credentials import (
    EchoFilter,
    credential_from,
    query_credential,
    refused_placeholder,
    scrubbed,
    with_credential,
)
from core.upstream import Answer

KEY = b"sk-pool-key-0123456789abcdefghij"
STAND_IN = b"[upstream key #1 ...ghij]"


@pytest.mark.parametrize(
    "path, key, rest",
    [
        ("/v1/models", None, "/v1/models"),
        ("/v1/models?limit=2", None, "/v1/models?limit=2"),
        ("/v1/models?api-key=kr-abc", "kr-abc", "/v1/models"),
        ("/v1/models?limit=2&key=kr-abc&order=asc", "kr-abc", "/v1/models?limit=2&order=asc"),
        ("/v1/models?API_KEY=kr%2Dabc", "kr-abc", "/v1/models"),
        ("/v1/models?key=&api-key=kr-abc", "kr-abc", "/v1/models"),  # an empty one is no key, still removed
        ("/v1/models?monkey=1", None, "/v1/models?monkey=1"),
    ],
)
def test_a_key_in_the_query_string_is_found_and_taken_out(path, key, rest):
    assert query_credential(path) == (key, rest)


def test_scrubbed_headers_keep_no_credential():
    fields = (
        (b"Authorization", b"Basic dXNlcjpwYXNz"),
        (b"api-key", b"kr-secret"),
        (b"x-api-key", b"kr-secret"),
        (b"Cookie", b"session=kr-secret"),
        (b"proxy-authorization", b"Basic kr-secret"),
        (b"content-type", b"application/json"),
    )
    result = scrubbed(fields, "[refused key]")
    assert result == (
        (b"Authorization", b"Bearer [refused key]"),
        (b"api-key", b"[refused key]"),
        (b"content-type", b"application/json"),
    )
    assert refused_placeholder("sk-live-abcdefgh1234") == "[refused key ...1234]"
    assert refused_placeholder("short") == "[refused key]"


@pytest.mark.parametrize("cut", [1, 5, len(KEY) - 1, len(KEY), len(KEY) + 3])
def test_an_echo_split_between_reads_is_still_replaced(cut):
    body = b'{"error": "bad key ' + KEY + b'", "again": "' + KEY + b'"}'
    start = body.index(KEY) + cut - 1  # somewhere inside (or just after) the first key
    echo = EchoFilter(KEY, STAND_IN)
    out = echo.feed(body[:start]) + echo.feed(body[start:]) + echo.flush()
    assert out == body.replace(KEY, STAND_IN)
    assert echo.replaced


def test_data_without_the_key_passes_unchanged_and_whole_at_the_end():
    echo = EchoFilter(KEY, STAND_IN)
    pieces = [b"data: sk-", b"pool is not it\n\n", b"sk-pool-key"]
    out = b"".join(echo.feed(p) for p in pieces) + echo.flush()
    assert out == b"".join(pieces)
    assert not echo.replaced


def test_a_retried_answer_loses_the_key_even_in_a_compressed_error():
    body = gzip.compress(b'{"error": {"message": "key ' + KEY + b' refused"}}')
    headers = httpx.Headers({"content-encoding": "gzip", "x-seen": KEY.decode()})
    answer = Answer(400, b"Bad Request", headers, body, 0.0, 0.0, 0.0)
    clean = answer.without_echo(KEY.decode(), STAND_IN.decode())
    assert clean.headers["x-seen"] == STAND_IN.decode()
    assert "content-encoding" not in clean.headers
    assert KEY not in clean.content and STAND_IN in clean.content
    untouched = Answer(200, b"OK", httpx.Headers({}), b"{}", 0.0, 0.0, 0.0)
    assert untouched.without_echo(KEY.decode(), STAND_IN.decode()) is untouched


PROTOCOL = b"sec-websocket-protocol"


@pytest.mark.parametrize(
    "fields, key",
    [
        (((PROTOCOL, b"realtime, openai-insecure-api-key.kr-abc, openai-beta.realtime-v1"),), "kr-abc"),
        (((b"Sec-WebSocket-Protocol", b"OpenAI-Insecure-API-Key.kr-abc"),), "kr-abc"),
        (((PROTOCOL, b"realtime, openai-insecure-api-key."),), None),  # an empty one is no key
        (((PROTOCOL, b"realtime"),), None),
        (((PROTOCOL, b"openai-insecure-api-key.kr-sub"), (b"authorization", b"Bearer kr-bearer")), "kr-bearer"),
    ],
)
def test_a_key_sent_as_a_websocket_subprotocol_is_found(fields, key):
    assert credential_from(fields) == key


def test_a_subprotocol_key_is_replaced_and_a_bearer_put_beside_it():
    fields = ((PROTOCOL, b"realtime, openai-insecure-api-key.kr-abc, openai-beta.realtime-v1"),)
    shown = scrubbed(fields, "[client key #1]", ensure=True)
    assert shown == (
        (PROTOCOL, b"realtime, openai-insecure-api-key.[client key #1], openai-beta.realtime-v1"),
        (b"authorization", b"Bearer [client key #1]"),
    )
    sent = with_credential(shown, KEY.decode())
    assert sent == (
        (PROTOCOL, b"realtime, openai-insecure-api-key." + KEY + b", openai-beta.realtime-v1"),
        (b"authorization", b"Bearer " + KEY),
    )
    assert credential_from(sent) == KEY.decode()


def _compressed(encoding: str, data: bytes) -> bytes:
    import gzip

    import brotli

    from core.bodies import zstd

    return {"gzip": gzip.compress, "br": brotli.compress, "zstd": zstd.compress}[encoding](data)


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_a_compressed_body_is_handed_on_decoded_only_when_it_quotes_the_secret(encoding: str):
    from core.credentials import SCAN_PIECE_BYTES, encoded_echo

    secret = b"sk-secret-0123456789"
    filler = bytes(range(256)) * (SCAN_PIECE_BYTES // 64)  # poorly compressible: the body spans many pieces
    quoted = _compressed(encoding, filler + b"key " + secret + b" end")
    assert encoded_echo(quoted, encoding, secret, b"[key]") == filler + b"key [key] end"
    assert encoded_echo(_compressed(encoding, filler), encoding, secret, b"[key]") is None
    assert encoded_echo(b"not compressed at all", encoding, secret, b"[key]") is None
    assert encoded_echo(secret, "identity", secret, b"[key]") is None  # plain bodies are the EchoFilter's


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "deflate"])
def test_a_stream_decoder_reads_a_body_piece_by_piece(encoding: str):
    import zlib

    from core.bodies import StreamDecoder

    data = b"data: {}\n\n" * 500
    body = zlib.compress(data) if encoding == "deflate" else _compressed(encoding, data)
    decoder = StreamDecoder(encoding)
    plain = b"".join(decoder.feed(body[i : i + 5]) for i in range(0, len(body), 5)) + decoder.flush()
    assert plain == data and not decoder.failed
