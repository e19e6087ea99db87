"""The one model a request names: decoys nested anywhere are not it, and two names are refused."""

from __future__ import annotations

import gzip
import json

import pytest

from core.errors import OpenAIError
from core.metadata import RequestedModel
from core.request_model import AMBIGUOUS, INVALID, _parsed_model, json_model, renamed_top_model, request_model

CHAT = "/v1/chat/completions"
JSON = "application/json"
FORM = "multipart/form-data; boundary=XyZ"
URLENCODED = "application/x-www-form-urlencoded"
MESSAGES = '"messages": [{"role": "user", "content": "hi"}]'


def part(name: str, value: str, head: str = "") -> bytes:
    return f'--XyZ\r\nContent-Disposition: form-data; name="{name}"{head}\r\n\r\n{value}\r\n'.encode()


AUDIO = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\x00\x01\r\n'
END = b"--XyZ--\r\n"


def read(path: str, content_type: str, body: bytes, encoding: str | None = None) -> RequestedModel | OpenAIError:
    fields = [(b"Content-Type", content_type.encode())] if content_type else []
    if encoding:
        fields.append((b"Content-Encoding", encoding.encode()))
    return request_model(path, tuple(fields), body, lambda: gzip.decompress(body))


def outcome(result: RequestedModel | OpenAIError) -> str | None:
    """The model, or the refusal's code (prefixed with !)."""
    if isinstance(result, OpenAIError):
        assert result.status == 400 and result.type == "invalid_request_error"
        return "!" + (result.code or "")
    return result.model


JSON_CASES = [
    # (body, the model upstream acts on, or the refusal)
    ('{"model": "gpt-4o-mini", ' + MESSAGES + "}", "gpt-4o-mini"),
    ("{" + MESSAGES + ', "model": "gpt-4o-mini"}', "gpt-4o-mini"),  # the SDK's order: messages first
    ('{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}', "gpt-4o-mini"),
    # decoys: a nested "model" placed first is not the request's model
    ('{"metadata": {"model": "gpt-4o-mini"}, "model": "gpt-4o", ' + MESSAGES + "}", "gpt-4o"),
    ('{"messages": [{"role": "user", "content": "hi", "model": "gpt-4o-mini"}], "model": "gpt-4o"}', "gpt-4o"),
    (
        '{"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",'
        ' "properties": {"model": {"type": "string", "enum": ["gpt-4o-mini"]}}}}}], "model": "gpt-4o"}',
        "gpt-4o",
    ),
    ('{"metadata": {"model": "gpt-4o-mini"}, ' + MESSAGES + "}", None),  # nested only: names none
    ('{"messages": [{"role": "user", "content": "say \\"model\\": \\"gpt-4o-mini\\""}], "model": "gpt-4o"}', "gpt-4o"),
    ('{"contents": [{"role": "model", "parts": []}], "model": "gpt-4o"}', "gpt-4o"),
    ('{"response_format": {"type": "json_schema"}, "model": "gpt-4o", "tools": []}', "gpt-4o"),
    # duplicates, in both orders, and other spellings of the same key
    ('{"model": "gpt-4o-mini", "model": "gpt-4o", ' + MESSAGES + "}", "!" + AMBIGUOUS),
    ('{"model": "gpt-4o", "model": "gpt-4o-mini", ' + MESSAGES + "}", "!" + AMBIGUOUS),
    ('{"model": "gpt-4o-mini", "metadata": {}, "model": "gpt-4o"}', "!" + AMBIGUOUS),
    ('{"mod\\u0065l": "gpt-4o", ' + MESSAGES + "}", "gpt-4o"),
    ('{"\\u006d\\u006f\\u0064\\u0065\\u006C": "gpt-4o"}', "gpt-4o"),
    ('{"model": "gpt-4o-mini", "mod\\u0065l": "gpt-4o"}', "!" + AMBIGUOUS),
    ('{"mod\\u0065l": "gpt-4o", "model": "gpt-4o-mini"}', "!" + AMBIGUOUS),
    ('{"model": "gpt-4o-mini", "Model": "gpt-4o"}', "!" + AMBIGUOUS),  # Go's encoding/json ignores case
    ('{"MODEL": "gpt-4o", ' + MESSAGES + "}", "!" + INVALID),
    # whitespace JSON allows
    ('{ "model" : "gpt-4o" }', "gpt-4o"),
    ('\n\t{\r\n  "model"\n:\t"gpt-4o",\n  "n": 1\n}\n', "gpt-4o"),
    ('\ufeff{"model": "gpt-4o"}', "gpt-4o"),  # a byte order mark, which Python's parser skips
    # values that are not a model name
    ('{"model": 4, ' + MESSAGES + "}", "!" + INVALID),
    ('{"model": null}', "!" + INVALID),
    ('{"model": ["gpt-4o-mini", "gpt-4o"]}', "!" + INVALID),
    ('{"model": {"id": "gpt-4o"}}', "!" + INVALID),
    ('{"model": true}', "!" + INVALID),
    ('{"model": ""}', "!" + INVALID),
    ('{"model": "gpt\\u002d4o"}', "gpt-4o"),
    # not JSON: refused when the parser has to settle it
    ('{"model": "gpt-4o-mini", "metadata": {"model": "x"', "!" + INVALID),
    ('{"metadata": {"model": "gpt-4o-mini"}, "model": "gpt-4o",', "!" + INVALID),
    # no model
    ('{"input": "hello"}', None),
    ('{"purpose": "batch", "supermodel": "x"}', None),
    ('[{"model": "gpt-4o"}]', None),
    ("", None),
]


@pytest.mark.parametrize("body, expected", JSON_CASES)
def test_the_top_level_model_of_a_json_body(body, expected):
    assert outcome(read(CHAT, JSON, body.encode())) == expected


@pytest.mark.parametrize("body, expected", [(b, e) for b, e in JSON_CASES if b.lstrip("\n\t\r \ufeff")[:1] == "{"])
def test_the_pattern_and_the_parser_agree(body, expected):
    data = body.encode().removeprefix(b"\xef\xbb\xbf")
    fast, parsed = outcome(json_model(data, data.index(b"{"))), outcome(_parsed_model(data))
    assert fast == parsed or (fast == expected and parsed == "!" + INVALID)  # the parser is the stricter


@pytest.mark.parametrize(
    "path, content_type, body, expected",
    [
        # multipart: the form field, once
        ("/v1/audio/transcriptions", FORM, AUDIO + part("model", "whisper-1") + END, "whisper-1"),
        ("/v1/audio/transcriptions", FORM, AUDIO + END, None),
        (
            "/v1/audio/transcriptions",
            FORM,
            part("model", "whisper-1") + part("model", "gpt-4o-transcribe"),
            "!" + AMBIGUOUS,
        ),
        (
            "/v1/audio/transcriptions",
            FORM,
            part("model", "gpt-4o-transcribe") + part("model", "whisper-1"),
            "!" + AMBIGUOUS,
        ),
        ("/v1/audio/transcriptions", FORM, part("Model", "gpt-4o-transcribe") + END, "!" + INVALID),
        ("/v1/audio/transcriptions", FORM, part("model", "whisper-1", '; filename="m"') + END, "!" + INVALID),
        (
            "/v1/audio/transcriptions",
            FORM,
            b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'  # a preamble is not a part
            + part("model", "gpt-4o-transcribe")
            + END,
            "gpt-4o-transcribe",
        ),
        (
            "/v1/audio/transcriptions",
            FORM,
            part("model", "whisper-1") + END + part("model", "gpt-4o-transcribe"),  # nor is the epilogue
            "whisper-1",
        ),
        (
            "/v1/audio/transcriptions",
            FORM,
            part("model", "whisper-1")
            + b'--XyZ\r\nContent-Disposition: form-data;\r\n name="model"\r\n\r\nx\r\n'
            + END,
            "!" + AMBIGUOUS,  # a folded header line
        ),
        (
            "/v1/audio/transcriptions",
            FORM,
            part("model", "whisper-1") + b"--XyZ\r\nContent-Disposition: form-data; name*=utf-8''mod%65l\r\n\r\nx\r\n",
            "!" + AMBIGUOUS,  # RFC 2231
        ),
        (
            "/v1/audio/transcriptions",
            FORM,
            b'--XyZ\nContent-Disposition: form-data; name="model"\n\ngpt-4o-transcribe\n--XyZ--\n',  # LF only
            "gpt-4o-transcribe",
        ),
        (
            "/v1/audio/transcriptions",
            FORM,
            part("file", 'a\r\n--XyZz\r\nContent-Disposition: form-data; name="model"\r\n\r\nx')
            + part("model", "whisper-1")
            + END,
            "whisper-1",  # a line that only starts like the boundary is data
        ),
        # urlencoded forms, which some relays bind like JSON
        (CHAT, URLENCODED, b"model=gpt-4o&stream=true", "gpt-4o"),
        (CHAT, URLENCODED, b"model=gpt-4o-mini&model=gpt-4o", "!" + AMBIGUOUS),
        (CHAT, URLENCODED, b"model=gpt-4o-mini&mod%65l=gpt-4o", "!" + AMBIGUOUS),
        # the URL: Realtime's ?model=, Azure's deployment
        ("/v1/realtime?model=gpt-realtime", "", b"", "gpt-realtime"),
        ("/v1/realtime?model=gpt-realtime&model=gpt-realtime-mini", "", b"", "!" + AMBIGUOUS),
        ("/v1/realtime?mod%65l=gpt-realtime", "", b"", "gpt-realtime"),
        ("/v1/realtime?model=", "", b"", "!" + INVALID),
        (CHAT + "?model=gpt-4o", JSON, b'{"model": "gpt-4o-mini"}', "!" + AMBIGUOUS),
        (CHAT + "?model=gpt-4o", JSON, b'{"model": "gpt-4o"}', "gpt-4o"),
        ("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", JSON, b'{"messages": []}', "gpt-4o"),
        ("/openai/deployments/gpt-4o/chat/completions", JSON, b'{"model": "gpt-4o"}', "gpt-4o"),
        ("/openai/deployments/gpt-4o/chat/completions", JSON, b'{"model": "gpt-4o-mini"}', "!" + AMBIGUOUS),
        ("/OpenAI/Deployments/gpt%2D4o/embeddings", JSON, b'{"input": "x"}', "gpt-4o"),
        ("/v1/embeddings?next=/openai/deployments/gpt-4o/", JSON, b'{"model": "e"}', "e"),
        # bodies that are not JSON name no model; JSON that keyrotor cannot read is refused
        ("/v1/realtime?model=gpt-realtime", "application/sdp", b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n", "gpt-realtime"),
        ("/v1/files/file-1/content", "application/octet-stream", b"\x00\x01model", None),
        (CHAT, JSON, b"not json", "!" + INVALID),
        (CHAT, JSON, '{"model": "gpt-4o"}'.encode("utf-16"), "!" + INVALID),
        (CHAT, "text/plain", '{"model": "gpt-4o"}'.encode("utf-16-le"), "!" + INVALID),
        (CHAT, "", b'{"model": "gpt-4o"}', "gpt-4o"),  # JSON without its content type is still JSON
    ],
)
def test_forms_urls_and_other_bodies(path, content_type, body, expected):
    assert outcome(read(path, content_type, body)) == expected


def test_a_compressed_body_is_read_decompressed():
    body = gzip.compress(json.dumps({"metadata": {"model": "gpt-4o-mini"}, "model": "gpt-4o"}).encode())
    assert outcome(read(CHAT, JSON, body, "gzip")) == "gpt-4o"


def test_a_body_keyrotor_cannot_decompress_is_refused():
    def undecodable() -> bytes:
        raise ValueError("unknown encoding")

    fields = ((b"content-type", b"application/json"), (b"content-encoding", b"x-custom"))
    refused = request_model(CHAT, fields, b'{"model": "gpt-4o-mini"}', undecodable)
    assert isinstance(refused, OpenAIError) and refused.code == INVALID and "x-custom" in refused.message


def test_a_refusal_says_what_was_named():
    refused = read(CHAT, JSON, b'{"model": "gpt-4o-mini", "model": "gpt-4o"}')
    assert isinstance(refused, OpenAIError)
    assert "'model': \"gpt-4o-mini\", 'model': \"gpt-4o\"" in refused.message
    assert refused.headers == {"x-should-retry": "false"}
    assert json.loads(refused.body())["error"]["code"] == AMBIGUOUS


@pytest.mark.parametrize(
    "body, expected",
    [
        (b'{"model": "cheap", "n": 1}', b'{"model": "gpt-4o-mini", "n": 1}'),
        (
            b'{"metadata": {"model": "cheap"}, "messages": [{"content": "\\"}{["}], "model" :"cheap"}',
            b'{"metadata": {"model": "cheap"}, "messages": [{"content": "\\"}{["}], "model" :"gpt-4o-mini"}',
        ),
        (b'{"mod\\u0065l": "ch\\u0065ap"}', b'{"mod\\u0065l": "gpt-4o-mini"}'),
        (b'{"metadata": {"model": "cheap"}, "model": "other"}', b'{"metadata": {"model": "cheap"}, "model": "other"}'),
    ],
)
def test_an_alias_renames_the_top_level_model_only(body, expected):
    assert renamed_top_model(body, "cheap", "gpt-4o-mini") == expected
