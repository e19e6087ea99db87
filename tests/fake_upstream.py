"""A local fake of the OpenAI HTTP API, for integration tests and benchmarks.

It answers like the real service does, down to the error bodies and headers the
proxy reacts to (401 invalid key, 429 rate limit / quota, 500), so the proxy's
key rotation can be exercised end to end with the official ``openai`` client,
without any network access. It listens on 127.0.0.1 only.

Use it in-process::

    with FakeUpstream().start() as up:
        up.set_key("sk-good-2", "ratelimit", times=1)
        ...  # point the proxy (or a client) at up.url + "/v1"
        assert up.keys_seen() == [...]

or as a separate process (benchmarks)::

    python tests/fake_upstream.py --port 0 [--stream-chunks N] [--stream-delay S]

which prints ``READY http://127.0.0.1:<port>`` once it accepts connections and
runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.parser
import email.policy
import gzip
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl

import brotli
import httpx
import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # installed with mitmproxy before 3.14
    from backports import zstd

try:
    from tests.fake_faults import HANG_SECONDS, Faults, StreamBroken, faulty_stream
except ImportError:  # run as a script (benchmarks): tests/ itself is on the path, the checkout is not
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fake_faults import HANG_SECONDS, Faults, StreamBroken, faulty_stream  # type: ignore[no-redef]
# The replies and token counts `run.py demo`'s stand-in gives too: one definition of what the fake answers.
from cli.demo_upstream import chat_usage, reply_pieces  # noqa: E402
from cli.demo_upstream import text_of as _text_of  # noqa: E402
from cli.demo_upstream import word_count as _word_count  # noqa: E402

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
BEHAVIOURS = frozenset(
    {
        "ok",
        "invalid",
        "ratelimit",
        "quota",
        "server_error",
        "deactivated",
        "disconnect",
        "echo",
        "echo_gzip",
        *(f"echo_{encoding}_ok" for encoding in ("gzip", "br", "zstd")),
        *(f"echo_stream_{encoding}" for encoding in ("gzip", "br", "zstd")),
        "hang",
        "hang_after_headers",
    }
)
# Keys nobody configured are judged by name, so tests and benchmarks can use
# fresh keys without calling set_key first.
VALID_PREFIXES = ("sk-good", "sk-bench")
FLAKY_PREFIX = "sk-flaky"  # always answered with a 500: the failover benchmark's bad key

MODELS: list[dict[str, Any]] = [
    {
        "id": "gpt-4o-mini",
        "object": "model",
        "created": 1721172741,
        "owned_by": "system",
    },
    {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"},
    {
        "id": "gpt-3.5-turbo",
        "object": "model",
        "created": 1677610602,
        "owned_by": "openai",
    },
    {
        "id": "text-embedding-3-small",
        "object": "model",
        "created": 1705948997,
        "owned_by": "system",
    },
]
MODELS_BY_ID = {m["id"]: m for m in MODELS}

EMBEDDING_DIMENSIONS = 8
SYSTEM_FINGERPRINT = "fp_fakeupstream"

# Success headers the real API sends; a proxy may read them to pace keys.
OK_RATELIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-limit-tokens": "10000000",
    "x-ratelimit-remaining-tokens": "9999000",
    "x-ratelimit-reset-tokens": "0s",
}

NO_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank "
    "username) if you're accessing the API from your browser and are prompted for a username and "
    "password. You can obtain an API key from https://platform.openai.com/account/api-keys."
)
INVALID_KEY_MESSAGE = (
    "Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys."
)
RATELIMIT_MESSAGE = (
    "Rate limit reached for gpt-4o-mini in organization org-xxx on requests per min (RPM): "
    "Limit 3, Used 3, Requested 1. Please try again in 20s. "
    "Visit https://platform.openai.com/account/rate-limits to learn more."
)
QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)
SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"
DEACTIVATED_MESSAGE = (
    "This key is associated with a deactivated account. If you feel this is an error, "
    "contact us through our help center at help.openai.com."
)
BAD_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
    "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
    "valid JSON. If you have trouble figuring out how to fix this, please contact us through our "
    "help center at help.openai.com.)"
)


@dataclass
class Received:
    """One request as the fake saw it (rejected ones included)."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    key: str | None
    at: float  # time.monotonic() on arrival
    query: str = ""  # the raw query string, without "?"


class BadRequest(Exception):
    """A 400 the handlers raise; carries OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# --------------------------------------------------------------------------- responses


def _request_id() -> str:
    return "req_" + os.urandom(16).hex()


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    all_headers = {"x-request-id": _request_id()}
    if headers:
        all_headers.update(headers)
    body = json.dumps(payload).encode()
    return Response(body, status_code=status, headers=all_headers, media_type="application/json")


def _error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return _json(status, _error_body(message, type_, param, code), headers)


def mask_key(key: str) -> str:
    """Mask a key the way OpenAI's 401 message does: first 6, stars, last 4."""
    return f"{key[:6]}{'*' * 20}{key[-4:]}"


async def _cut_short(scope: Scope, receive: Receive, send: Send) -> None:
    """A connection that dies mid-answer: headers promise a body that never arrives whole."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"id": "chatcmpl-', "more_body": True})
    # Returning now leaves the promised body unsent: the server closes the connection.


async def _hang(scope: Scope, receive: Receive, send: Send) -> None:
    """A key whose requests are never answered (an upstream that accepts and then says nothing)."""
    await asyncio.sleep(HANG_SECONDS)


async def _hang_after_headers(scope: Scope, receive: Receive, send: Send) -> None:
    """A stream that starts (200, text/event-stream) and never sends its first byte."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await asyncio.sleep(HANG_SECONDS)


def _compressor(encoding: str) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
    """(compress a piece and flush it, finish) for a content-encoding: a stream sent compressed."""
    if encoding == "gzip":
        gz = zlib.compressobj(wbits=31)
        return (lambda data: gz.compress(data) + gz.flush(zlib.Z_SYNC_FLUSH)), gz.flush
    if encoding == "br":
        br = brotli.Compressor()
        return (lambda data: br.process(data) + br.flush()), br.finish
    zs = zstd.ZstdCompressor()
    return (lambda data: zs.compress(data, zs.FLUSH_BLOCK)), (lambda: zs.flush(zs.FLUSH_FRAME))


def _echo_stream(key: str, encoding: str) -> Callable[[Scope, Receive, Send], Any]:
    """A chat stream, compressed piece by piece, whose reply quotes the key it was sent."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        compress, finish = _compressor(encoding)
        headers = [(b"content-type", b"text/event-stream"), (b"content-encoding", encoding.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        base = {"id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini"}
        events = [
            _chunk(base, {"role": "assistant", "content": ""}, None, False),
            _chunk(base, {"content": f"You sent {key}, "}, None, False),
            _chunk(base, {"content": f"yes {key}."}, None, False),
            _chunk(base, {}, "stop", False),
            b"data: [DONE]\n\n",
        ]
        data = b"".join(events)
        for start in range(0, len(data), 7):  # small pieces: the key is cut between several
            await send({"type": "http.response.body", "body": compress(data[start : start + 7]), "more_body": True})
        await send({"type": "http.response.body", "body": finish(), "more_body": False})

    return app


def _rejection(behaviour: str, key: str, retry_after: str) -> Response | None:
    """The error response for a key behaviour, or None when the key is served."""
    if behaviour == "ok":
        return None
    if behaviour == "invalid":
        return _error(
            401,
            INVALID_KEY_MESSAGE.format(masked=mask_key(key)),
            code="invalid_api_key",
        )
    if behaviour == "ratelimit":
        headers = {
            "retry-after": retry_after,
            "x-ratelimit-limit-requests": "3",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1s",
        }
        return _error(
            429,
            RATELIMIT_MESSAGE,
            "requests",
            code="rate_limit_exceeded",
            headers=headers,
        )
    if behaviour == "quota":
        return _error(429, QUOTA_MESSAGE, "insufficient_quota", code="insufficient_quota")
    if behaviour == "server_error":
        return _error(500, SERVER_ERROR_MESSAGE, "server_error")
    if behaviour == "deactivated":
        return _error(401, DEACTIVATED_MESSAGE, code="account_deactivated")
    if behaviour == "disconnect":
        return _cut_short  # type: ignore[return-value]
    if behaviour == "hang":
        return _hang  # type: ignore[return-value]
    if behaviour == "hang_after_headers":
        return _hang_after_headers  # type: ignore[return-value]
    if behaviour == "echo":  # a relay that quotes the key it was sent, in a header and the body
        return _json(200, {"object": "list", "data": MODELS, "received_key": key}, {"x-received-key": key})
    if behaviour == "echo_gzip":  # the same in a compressed error body
        body = gzip.compress(
            json.dumps(_error_body(f"Key {key} is not allowed here", "invalid_request_error")).encode()
        )
        return Response(body, 400, {"content-encoding": "gzip", "x-request-id": _request_id()}, "application/json")
    if behaviour.startswith("echo_") and behaviour.endswith("_ok"):  # a compressed success that quotes it
        encoding = behaviour.removeprefix("echo_").removesuffix("_ok")
        compress, finish = _compressor(encoding)
        body = compress(json.dumps({"object": "list", "data": MODELS, "received_key": key}).encode()) + finish()
        return Response(body, 200, {"content-encoding": encoding, "x-request-id": _request_id()}, "application/json")
    if behaviour.startswith("echo_stream_"):
        return _echo_stream(key, behaviour.removeprefix("echo_stream_"))  # type: ignore[return-value]
    raise AssertionError(f"unknown behaviour {behaviour!r}")


# --------------------------------------------------------------------------- request parsing


def _headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def credential(headers: dict[str, str]) -> str | None:
    """The API key of a request: OpenAI's Bearer token, else Azure's api-key."""
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("api-key", "").strip() or None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise BadRequest(BAD_JSON_MESSAGE) from None
    if not isinstance(data, dict):
        raise BadRequest(f"{body[:100]!r} is not of type 'object'")
    return data


# --------------------------------------------------------------------------- chat completions


def _model_of(
    data: dict[str, Any], missing: str = "you must provide a model parameter", code: str | None = None
) -> str:
    """The request's model; without one, OpenAI's 400 (whose wording differs from endpoint to endpoint)."""
    model = data.get("model")
    if not model or not isinstance(model, str):
        raise BadRequest(missing, param="model", code=code)
    return model


def _validate_chat(data: dict[str, Any]) -> tuple[str, list[Any]]:
    model = _model_of(data)
    messages = data.get("messages")
    if messages is None:
        raise BadRequest(
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f"{messages!r} is too short - 'messages'", param="messages")
    return model, messages


def _chunk(base: dict[str, Any], delta: dict[str, Any], finish: str | None, usage: bool) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    payload = {**base, "choices": [choice]}
    if usage:
        payload["usage"] = None
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def _stream_events(
    base: dict[str, Any], pieces: list[str], usage: dict[str, int] | None, delay: float, usage_delay: float = 0.0
) -> AsyncIterator[bytes]:
    with_usage = usage is not None
    yield _chunk(base, {"role": "assistant", "content": "", "refusal": None}, None, with_usage)
    for piece in pieces:
        # Sleeping before each piece models time-to-first-token and the pace
        # between tokens; each yield is flushed to the socket on its own.
        if delay > 0:
            await asyncio.sleep(delay)
        yield _chunk(base, {"content": piece}, None, with_usage)
    yield _chunk(base, {}, "stop", with_usage)
    if usage is not None:
        if usage_delay > 0:
            await asyncio.sleep(usage_delay)
        yield (b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
    yield b"data: [DONE]\n\n"


# --------------------------------------------------------------------------- embeddings


def _embedding_inputs(value: Any) -> list[Any]:
    """Normalise ``input``: a string, a token list, or a list of either."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [value]
        if all(isinstance(v, str | list) for v in value):
            return value
    raise BadRequest("'input' must be a string, a list of strings or a list of tokens", param="input")


def _vector(item: Any) -> list[float]:
    """A deterministic pseudo-embedding, so equal inputs embed equally."""
    text = item if isinstance(item, str) else json.dumps(item)
    digest = hashlib.sha256(text.encode()).digest()
    return [round((b - 127.5) / 127.5, 6) for b in digest[:EMBEDDING_DIMENSIONS]]


def _tokens(item: Any) -> int:
    return _word_count(item) if isinstance(item, str) else len(item)


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        # The openai client asks for base64 (little-endian float32) by default.
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


# --------------------------------------------------------------------------- responses API


def response_input_messages(value: Any) -> list[dict[str, Any]]:
    """The Responses API's `input` (a string, or a list of messages and items) as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return [
            {"role": m.get("role", "user"), "content": _text_of(m.get("content"))}
            for m in value
            if isinstance(m, dict) and "content" in m
        ]
    raise BadRequest("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")


def is_reasoning_model(model: str) -> bool:
    return model.startswith(("o1", "o3", "o4", "gpt-5"))


REASONING_TOKENS = 4  # what the fake's reasoning models "think" before each answer


def response_usage(messages: list[dict[str, Any]], instructions: Any, reply: str, model: str) -> dict[str, Any]:
    # The instructions are a fixed prefix, as prompt caching serves it: their tokens are "cached".
    cached = _word_count(instructions) if isinstance(instructions, str) else 0
    prompt = chat_usage(messages, reply)["prompt_tokens"] + cached
    reasoning = REASONING_TOKENS if is_reasoning_model(model) else 0
    output = _word_count(reply) + reasoning
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output,
    }


def _response_object(response_id: str, model: str, data: dict[str, Any], status: str) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": data.get("instructions"),
        "max_output_tokens": data.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": data.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": data.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": {},
    }


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "added" else []
    return {
        "id": item_id,
        "type": "message",
        "status": "completed" if status == "completed" else "in_progress",
        "role": "assistant",
        "content": content,
    }


def _sse_event(kind: str, payload: dict[str, Any]) -> bytes:
    # The Responses API names each event twice: in an `event:` line and in the JSON's `type`.
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps({"type": kind, **payload}).encode() + b"\n\n"


async def _response_events(
    base: dict[str, Any], item_id: str, pieces: list[str], usage: dict[str, Any], delay: float
) -> AsyncIterator[bytes]:
    text = "".join(pieces)
    sequence = iter(range(1_000_000))
    yield _sse_event("response.created", {"sequence_number": next(sequence), "response": base})
    yield _sse_event("response.in_progress", {"sequence_number": next(sequence), "response": base})
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield _sse_event(
        "response.output_item.added",
        {"sequence_number": next(sequence), "output_index": 0, "item": _message_item(item_id, "", "added")},
    )
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield _sse_event("response.content_part.added", {"sequence_number": next(sequence), **where, "part": part})
    for piece in pieces:
        if delay > 0:
            await asyncio.sleep(delay)
        yield _sse_event(
            "response.output_text.delta", {"sequence_number": next(sequence), **where, "delta": piece, "logprobs": []}
        )
    yield _sse_event(
        "response.output_text.done", {"sequence_number": next(sequence), **where, "text": text, "logprobs": []}
    )
    yield _sse_event(
        "response.content_part.done", {"sequence_number": next(sequence), **where, "part": {**part, "text": text}}
    )
    done_item = _message_item(item_id, text, "completed")
    yield _sse_event(
        "response.output_item.done", {"sequence_number": next(sequence), "output_index": 0, "item": done_item}
    )
    final = {**base, "status": "completed", "output": [done_item], "usage": usage}
    yield _sse_event("response.completed", {"sequence_number": next(sequence), "response": final})


# --------------------------------------------------------------------------- images, audio, moderations

# A real 1x1 PNG: what a generated image's bytes look like to whoever stores them.
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
SPEECH_FORMATS = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
AUDIO_BYTES_PER_SECOND = 16_000  # how long the fake takes an uploaded audio file to be
IMAGE_TOKENS = 272  # output tokens of one GPT Image picture, low quality
INSECURE_KEY_PROTOCOL = "openai-insecure-api-key."  # how browsers send a Realtime key
REALTIME_AUDIO_BYTES_PER_TOKEN = 50  # 24 kHz 16-bit PCM, about 20 ms an audio token


def speech_bytes(text: str) -> bytes:
    """Fake MP3 bytes, deterministic, and not UTF-8: an ID3 header, then frames of noise."""
    digest = hashlib.sha256(text.encode()).digest()
    return b"ID3\x04\x00\x00\x00\x00\x00\x00" + (b"\xff\xfb\x90\x64" + digest) * max(4, len(text))


def form_fields(content_type: str, body: bytes) -> dict[str, tuple[bytes, str | None, str | None]]:
    """A multipart/form-data body's parts: name → (value, filename, content type)."""
    if "multipart/form-data" not in content_type:
        raise BadRequest("Expected a multipart/form-data body.")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"content-type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_payload(decode=True) or b"", part.get_filename(), part.get_content_type())
    return fields


# --------------------------------------------------------------------------- objects scoped per key


def _not_found(message: str, param: str | None = None) -> Response:
    return _error(404, message, "invalid_request_error", param=param)


class ScopedObjects:
    """Files, batches, stored responses and vector stores as OpenAI keeps them: each belongs to
    the project of the key that made it, and any other key gets a 404 for it.

    `answer` handles these endpoints before the stateless ones; a Responses request only has its
    `previous_response_id` checked and its id reserved here, then the normal handler answers.
    """

    def __init__(self, responses: Callable[[bytes, str | None], Response]) -> None:
        self._lock = threading.Lock()
        self._owner: dict[str, str] = {}  # object id → the key that made it
        self._objects: dict[str, dict[str, Any]] = {}
        self._contents: dict[str, bytes] = {}  # file id → its bytes
        self._responses = responses

    def owner_of(self, object_id: str) -> str | None:
        with self._lock:
            return self._owner.get(object_id)

    def _keep(self, key: str, value: dict[str, Any], content: bytes | None = None) -> dict[str, Any]:
        with self._lock:
            self._owner[value["id"]] = key
            order = self._objects.get(value["id"], {}).get("_order", len(self._objects))  # ties in created_at
            self._objects[value["id"]] = {**value, "_order": order}
            if content is not None:
                self._contents[value["id"]] = content
        return value

    def _mine(self, key: str, object_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._objects.get(object_id) if self._owner.get(object_id) == key else None
        return {k: v for k, v in found.items() if k != "_order"} if found is not None else None

    def _list(self, key: str, kind: str, query: str) -> Response:
        """A cursor page of this key's objects of `kind`, newest first, as OpenAI lists them."""
        params = dict(parse_qsl(query))
        try:
            limit = max(1, min(int(params.get("limit", "20")), 100))
        except ValueError:
            raise BadRequest("Invalid 'limit': expected an integer.", param="limit") from None
        with self._lock:
            mine = [v for i, v in self._objects.items() if self._owner.get(i) == key and v.get("object") == kind]
        mine.sort(key=lambda v: (v.get("created_at", 0), v["_order"]), reverse=params.get("order", "desc") != "asc")
        after = params.get("after")
        if after:
            at = next((n for n, v in enumerate(mine) if v["id"] == after), None)
            if at is None:
                return _not_found(f"No such object: {after}", "after")
            mine = mine[at + 1 :]
        page = [{k: v for k, v in item.items() if k != "_order"} for item in mine[:limit]]
        return _json(
            200,
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(mine) > limit,
            },
        )

    def answer(
        self, method: str, path: str, key: str, body: bytes, content_type: str, query: str = ""
    ) -> Response | None:
        parts = path.strip("/").split("/")  # v1, collection, id, ...
        if len(parts) < 2 or parts[0] != "v1":
            return None
        collection, rest = parts[1], parts[2:]
        kinds = {"files": "file", "batches": "batch", "vector_stores": "vector_store"}
        if method == "GET" and not rest and collection in kinds:
            return self._list(key, kinds[collection], query)
        if collection == "files":
            return self._files(method, rest, key, body, content_type)
        if collection == "batches":
            return self._batches(method, rest, key, body)
        if collection == "responses":
            return self._response(method, rest, key, body)
        if collection == "vector_stores":
            return self._vector_stores(method, rest, key, body)
        if collection == "conversations":
            return self._conversations(method, rest, key, body)
        return None

    def _conversations(self, method: str, rest: list[str], key: str, body: bytes) -> Response | None:
        if method == "POST" and not rest:
            conversation = {
                "id": "conv_" + os.urandom(24).hex(),
                "object": "conversation",
                "created_at": int(time.time()),
                "metadata": _json_object(body).get("metadata") or {},
            }
            return _json(200, self._keep(key, conversation))
        if not rest:
            return None
        conversation = self._mine(key, rest[0])
        if conversation is None:
            return _not_found(f"Conversation with id '{rest[0]}' not found.")
        if method == "GET" and len(rest) == 1:
            return _json(200, conversation)
        if method == "POST" and len(rest) == 1:
            return _json(200, self._keep(key, {**conversation, "metadata": _json_object(body).get("metadata") or {}}))
        if method == "DELETE" and len(rest) == 1:
            with self._lock:
                self._owner.pop(rest[0], None)
            return _json(200, {"id": rest[0], "object": "conversation.deleted", "deleted": True})
        return None

    def _files(self, method: str, rest: list[str], key: str, body: bytes, content_type: str) -> Response | None:
        if method == "POST" and not rest:
            fields = form_fields(content_type, body)
            content, filename, _ = fields.get("file", (b"", None, None))
            purpose = fields.get("purpose", (b"", None, None))[0].decode()
            if not filename or not purpose:
                raise BadRequest("Missing required parameter: 'file' and 'purpose'.", code="missing_required_parameter")
            return _json(200, self._new_file(key, content, filename, purpose))
        if not rest:
            return None
        file = self._mine(key, rest[0])
        if file is None:
            return _not_found(f"No such File object: {rest[0]}", "id")
        if method == "GET" and rest[1:] == ["content"]:
            with self._lock:
                content = self._contents[rest[0]]
            return Response(content, 200, {"content-type": "application/octet-stream"})
        if method == "GET" and len(rest) == 1:
            return _json(200, file)
        if method == "DELETE" and len(rest) == 1:
            with self._lock:
                self._owner.pop(rest[0], None)
            return _json(200, {"id": rest[0], "object": "file", "deleted": True})
        return None

    def _new_file(self, key: str, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file = {
            "id": "file-" + os.urandom(12).hex(),
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        return self._keep(key, file, content)

    def _batches(self, method: str, rest: list[str], key: str, body: bytes) -> Response | None:
        if method == "POST" and not rest:
            data = _json_object(body)
            input_id = data.get("input_file_id")
            if not isinstance(input_id, str) or self._mine(key, input_id) is None:
                return _error(
                    400,
                    f"Invalid 'input_file_id': '{input_id}'. File with ID '{input_id}' does not exist.",
                    param="input_file_id",
                )
            with self._lock:
                lines = [line for line in self._contents[input_id].splitlines() if line.strip()]
            results = b"".join(
                json.dumps({"custom_id": json.loads(line).get("custom_id"), "response": {"status_code": 200}}).encode()
                + b"\n"
                for line in lines
            )
            output = self._new_file(key, results, "batch_output.jsonl", "batch_output")
            now = int(time.time())
            batch = {
                "id": "batch_" + os.urandom(12).hex(),
                "object": "batch",
                "endpoint": data.get("endpoint"),
                "input_file_id": input_id,
                "completion_window": data.get("completion_window"),
                "status": "completed",
                "output_file_id": output["id"],
                "error_file_id": None,
                "created_at": now,
                "completed_at": now,
                "request_counts": {"total": len(lines), "completed": len(lines), "failed": 0},
                "metadata": data.get("metadata"),
            }
            return _json(200, self._keep(key, batch))
        if rest:
            batch = self._mine(key, rest[0])
            if batch is None:
                return _not_found(f"No batch found with id '{rest[0]}'.", "batch_id")
            if method == "GET" and len(rest) == 1:
                return _json(200, batch)
            if method == "POST" and rest[1:] == ["cancel"]:
                return _json(200, {**batch, "status": "cancelled"})
        return None

    def _response(self, method: str, rest: list[str], key: str, body: bytes) -> Response | None:
        if method == "POST" and not rest:
            data = _json_object(body)
            previous = data.get("previous_response_id")
            if previous is not None and self._mine(key, previous) is None:
                return _error(
                    404,
                    f"Previous response with id '{previous}' not found.",
                    "invalid_request_error",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            conversation = data.get("conversation")
            if isinstance(conversation, dict):
                conversation = conversation.get("id")
            if conversation is not None and self._mine(key, conversation) is None:
                return _not_found(f"Conversation with id '{conversation}' not found.", "conversation")
            response_id = "resp_" + os.urandom(24).hex()
            if data.get("store", True) is not False:
                self._keep(key, {"id": response_id, "object": "response", "model": data.get("model")})
            return self._responses(body, response_id)
        if rest:
            stored = self._mine(key, rest[0])
            if stored is None:
                return _not_found(f"Response with id '{rest[0]}' not found.")
            if method == "GET" and len(rest) == 1:
                return _json(200, _response_object(rest[0], stored.get("model") or "", {}, "completed"))
            if method == "DELETE" and len(rest) == 1:
                with self._lock:
                    self._owner.pop(rest[0], None)
                return _json(200, {"id": rest[0], "object": "response", "deleted": True})
        return None

    def _vector_stores(self, method: str, rest: list[str], key: str, body: bytes) -> Response | None:
        if method == "POST" and not rest:
            data = _json_object(body)
            file_ids = data.get("file_ids") or []
            missing = next((f for f in file_ids if self._mine(key, f) is None), None)
            if missing is not None:
                return _not_found(f"No such File object: {missing}", "file_ids")
            store = {
                "id": "vs_" + os.urandom(12).hex(),
                "object": "vector_store",
                "name": data.get("name"),
                "created_at": int(time.time()),
                "status": "completed",
                "file_counts": {"completed": len(file_ids), "total": len(file_ids)},
            }
            return _json(200, self._keep(key, store))
        if not rest:
            return None
        store = self._mine(key, rest[0])
        if store is None:
            return _not_found(f"No vector store found with id '{rest[0]}'.")
        if method == "GET" and len(rest) == 1:
            return _json(200, store)
        if method == "POST" and len(rest) == 1:  # update
            changes = {k: v for k, v in _json_object(body).items() if k in ("name", "metadata")}
            return _json(200, self._keep(key, {**store, **changes}))
        if method == "DELETE" and len(rest) == 1:
            with self._lock:
                self._owner.pop(rest[0], None)
            return _json(200, {"id": rest[0], "object": "vector_store.deleted", "deleted": True})
        if method == "POST" and rest[1:] == ["files"]:
            file_id = _json_object(body).get("file_id")
            if not isinstance(file_id, str) or self._mine(key, file_id) is None:
                return _not_found(f"No such File object: {file_id}", "file_id")
            return _json(200, {"id": file_id, "object": "vector_store.file", "vector_store_id": rest[0]})
        return None


# --------------------------------------------------------------------------- key rules


@dataclass
class _Rule:
    behaviour: str
    remaining: int | None  # None: for ever
    retry_after: str


class _KeyBook:
    """Per-key behaviours; set from the test thread, read on the server loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: dict[str, _Rule] = {}

    def set(self, key: str, behaviour: str, times: int | None, retry_after: str) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; expected one of {sorted(BEHAVIOURS)}")
        if times is not None and times <= 0:
            behaviour, times = "ok", None
        with self._lock:
            self._rules[key] = _Rule(behaviour, times, retry_after)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def take(self, key: str) -> tuple[str, str]:
        """The behaviour for this request of ``key`` (uses up one of ``times``)."""
        with self._lock:
            rule = self._rules.get(key)
            if rule is None:
                if key.startswith(FLAKY_PREFIX):
                    return "server_error", "1"
                return ("ok" if key.startswith(VALID_PREFIXES) else "invalid"), "1"
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    # Spent: from now on the key is served normally.
                    self._rules[key] = _Rule("ok", None, rule.retry_after)
            return rule.behaviour, rule.retry_after


# --------------------------------------------------------------------------- server


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _http_name() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


Handler = Callable[[bytes], Response]


class FakeUpstream:
    """The fake OpenAI server; see the module docstring."""

    def __init__(self, stream_chunks: int = 5, stream_delay: float = 0.0, models: Iterable[str] | None = None) -> None:
        # Both may be changed between requests; each request reads them once.
        self.stream_chunks = stream_chunks
        self.stream_delay = stream_delay
        # The models this server has, like a relay station's group: others get model_not_found.
        self.models = set(models) if models is not None else None
        self.answer_delay = 0.0  # seconds every request waits before it is answered
        # A relay station that fetches images: with a user agent set, each chat request's image URLs are
        # fetched (from `fetch_from`, an address of its own on loopback) before it is answered.
        self.fetch_images_as: str | None = None
        self.fetch_from = "127.0.0.2"
        self.image_fetches: list[tuple[str, int]] = []  # (URL, status) of each fetch, in order
        self.answer_model: str | None = None  # the model chat answers name (a relay that swaps models)
        self.usage_delay = 0.0  # seconds a chat stream waits between its finish chunk and its usage chunk
        # Each chat stream's events as they were sent, in order: what upstream produced (and was cut off at).
        self.streams: list[list[bytes]] = []
        self.stream_times: list[list[float]] = []  # when each of those events was handed to the server (time.time())
        self.url = ""  # set by start()
        self.port = 0
        self.received: list[Received] = []
        # Realtime: each message a session sent, (session number, parsed JSON or the raw bytes), in order.
        self.realtime_messages: list[tuple[int, Any]] = []
        # False stops recording (benchmark processes would otherwise grow).
        self.record = True
        self._received_lock = threading.Lock()
        self._keys = _KeyBook()
        self._sessions = 0  # Realtime sessions accepted
        self.faults = Faults()  # a request's, a model's, a key's rate or everything's: tests/fake_faults.py
        self.objects = ScopedObjects(self._responses)  # files, batches, stored responses, vector stores
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/v1/responses"): self._responses,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/moderations"): self._moderations,
            ("POST", "/v1/images/generations"): self._images,
            ("POST", "/v1/audio/speech"): self._speech,
        }
        # Multipart uploads: their handlers also get the content type, which holds the boundary.
        self._form_routes: dict[tuple[str, str], Callable[[bytes, str], Response]] = {
            ("POST", "/v1/audio/transcriptions"): self._transcription,
            ("POST", "/v1/audio/translations"): self._transcription,
        }
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # ----------------------------------------------------------------- public API

    def start(self, port: int = 0, timeout: float = 10.0) -> FakeUpstream:
        """Serve on 127.0.0.1:``port`` (0: a free one) in a background thread.

        Returns once the server accepts connections.
        """
        if self._thread is not None:
            raise RuntimeError("FakeUpstream already started")
        sock = self._bind(port)
        self.port = sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        config = uvicorn.Config(
            self._asgi,
            interface="asgi3",  # a bound method defeats uvicorn's auto-detection
            http=_http_name(),
            loop=_loop_name(),
            lifespan="off",
            log_level="warning",
            access_log=False,
            # Bounded so stop() never hangs on a stream a client left open.
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._serve,
            args=(sock,),
            name=f"fake-upstream-{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._wait_started(timeout)
        log.debug("fake upstream serving on %s", self.url)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout=5)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=2)
        self._server = self._thread = None

    def set_key(self, key: str, behaviour: str, times: int | None = None, retry_after: str = "1") -> None:
        """Make ``key`` behave so (for its next ``times`` requests, else for ever)."""
        self._keys.set(key, behaviour, times, retry_after)

    def keys_seen(self) -> list[str]:
        """The credential of each request that had one, in arrival order."""
        with self._received_lock:
            return [r.key for r in self.received if r.key is not None]

    def reset(self) -> None:
        """Forget recorded requests and key behaviours (between tests)."""
        with self._received_lock:
            self.received.clear()
            self.realtime_messages.clear()
            self.streams.clear()
        self._keys.clear()
        self.faults.clear()

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- serving

    @staticmethod
    def _bind(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A fixed --port can be reused right after a previous run exits.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        return sock

    def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        server = self._server
        try:
            # Our own loop in this thread: uvicorn's run() would install
            # process-wide loop/signal settings that belong to the test runner.
            with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
                runner.run(server.serve(sockets=[sock]))
        # SystemExit included: uvicorn exits on startup errors.
        except BaseException as exc:
            self._failure = exc
            log.exception("fake upstream stopped with an error")
        finally:
            sock.close()

    def _wait_started(self, timeout: float) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"fake upstream failed to start: {self._failure!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake upstream did not start within {timeout}s")
            time.sleep(0.005)

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One entry point instead of a Router: auth must run before routing and
        # every request must be recorded, and a dict lookup is the cheapest route.
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            response = await self._respond(request)
            await response(scope, receive, send)
        except StreamBroken:
            pass  # returning mid-body: the server drops the connection, like an upstream that breaks off
        except ClientDisconnect:
            log.debug("client went away during %s %s", scope["method"], scope["path"])

    async def _respond(self, request: Request) -> Response:
        at = time.monotonic()
        scope = request.scope
        method, path = scope["method"], scope["path"]
        body = await request.body()
        headers = _headers(scope)
        key = credential(headers)
        self._record(Received(method, path, headers, body, key, at, scope["query_string"].decode("latin-1")))
        if self.answer_delay:
            await asyncio.sleep(self.answer_delay)
        if self.fetch_images_as and path == "/v1/chat/completions":
            await self._fetch_images(body)
        if key is None:
            return _error(401, NO_KEY_MESSAGE)
        behaviour, retry_after = self._keys.take(key)
        rejection = _rejection(behaviour, key, retry_after)
        if rejection is not None:
            log.debug("%s %s rejected: key %s is %s", method, path, mask_key(key), behaviour)
            return rejection
        fault = await self.faults.answer(key, body)
        if fault is not None:
            return fault
        try:
            scoped = self.objects.answer(
                method, path, key, body, headers.get("content-type", ""), scope["query_string"].decode("latin-1")
            )
        except BadRequest as exc:
            return _error(400, exc.message, param=exc.param, code=exc.code)
        if scoped is not None:
            return scoped
        form_handler = self._form_routes.get((method, path))
        if form_handler is not None:
            try:
                return form_handler(body, headers.get("content-type", ""))
            except BadRequest as exc:
                return _error(400, exc.message, param=exc.param, code=exc.code)
        handler = self._routes.get((method, path))
        if handler is None:
            if method == "GET" and path.startswith("/v1/models/"):
                return self._model(path.removeprefix("/v1/models/"))
            return _error(404, f"Invalid URL ({method} {path})")
        try:
            return handler(body)
        except BadRequest as exc:
            return _error(400, exc.message, param=exc.param, code=exc.code)

    async def _fetch_images(self, body: bytes) -> None:
        """GET every image URL of the request, as a relay does before it forwards or answers."""
        try:
            messages = json.loads(body).get("messages") or []
        except (ValueError, AttributeError):
            return
        urls = [
            part["image_url"]["url"]
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), list)
            for part in m["content"]
            if isinstance(part, dict) and isinstance(part.get("image_url"), dict) and "url" in part["image_url"]
        ]
        transport = httpx.AsyncHTTPTransport(local_address=self.fetch_from)
        headers = {"user-agent": self.fetch_images_as or "", "x-relay-note": "fetched by the fake relay"}
        async with httpx.AsyncClient(transport=transport, headers=headers, timeout=10, trust_env=False) as client:
            for url in urls:
                try:
                    status = (await client.get(url)).status_code
                except httpx.HTTPError:
                    status = 0
                self.image_fetches.append((url, status))

    def _record(self, received: Received) -> None:
        if self.record:
            with self._received_lock:
                self.received.append(received)

    # ----------------------------------------------------------------- realtime

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`/v1/realtime?model=…`, as OpenAI's Realtime API speaks it (a small part of it)."""
        headers = _headers(scope)
        protocols = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        protocol_key = next(
            (p[len(INSECURE_KEY_PROTOCOL) :] for p in protocols if p.startswith(INSECURE_KEY_PROTOCOL)), None
        )
        bearer = credential(headers)
        key = bearer or protocol_key
        query = scope["query_string"].decode("latin-1")
        self._record(Received("GET", scope["path"], headers, b"", key, time.monotonic(), query))
        await receive()  # websocket.connect
        model = next((p[6:] for p in query.split("&") if p.startswith("model=")), "")
        behaviour = self._keys.take(key)[0] if key else "invalid"
        # Two different keys (a header and a subprotocol) would be a client mixing credentials up.
        mixed = bearer is not None and protocol_key is not None and bearer != protocol_key
        if scope["path"] != "/v1/realtime" or not model or behaviour != "ok" or mixed:
            await send({"type": "websocket.close", "code": 1008})  # refused before the upgrade: HTTP 403
            return
        with self._received_lock:
            session = self._sessions = self._sessions + 1
        await send({"type": "websocket.accept", "subprotocol": "realtime" if "realtime" in protocols else None})
        await self._send_event(send, "session.created", session={"id": f"sess_{session}", "model": model})
        items: list[dict[str, Any]] = []
        audio_bytes = 0
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                self._remember(session, message["bytes"])
                continue
            try:
                event = json.loads(message.get("text") or "")
            except ValueError:
                await self._send_event(send, "error", error={"type": "invalid_request_error", "message": "Bad JSON"})
                continue
            self._remember(session, event)
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "session.update":
                await self._send_event(send, "session.updated", session={"id": f"sess_{session}", "model": model})
            elif kind == "input_audio_buffer.append":
                audio_bytes += len(event.get("audio") or "") * 3 // 4
            elif kind == "conversation.item.create":
                item = {"id": "item_" + os.urandom(8).hex(), **(event.get("item") or {})}
                items.append(item)
                await self._send_event(send, "conversation.item.created", item=item)
            elif kind == "response.create":
                await self._respond_realtime(send, items, audio_bytes)
                audio_bytes = 0
            else:
                error = {"type": "invalid_request_error", "message": f"Unknown event type {kind!r}"}
                await self._send_event(send, "error", error=error)

    def _remember(self, session: int, message: Any) -> None:
        if self.record:
            with self._received_lock:
                self.realtime_messages.append((session, message))

    async def _respond_realtime(self, send: Send, items: list[dict[str, Any]], audio_bytes: int) -> None:
        messages = [{"role": i.get("role", "user"), "content": _text_of(i.get("content"))} for i in items]
        pieces = reply_pieces(messages or [{"role": "user", "content": ""}], self.stream_chunks)
        response_id, item_id = "resp_" + os.urandom(8).hex(), "item_" + os.urandom(8).hex()
        await self._send_event(send, "response.created", response={"id": response_id, "status": "in_progress"})
        for piece in pieces:
            if self.stream_delay > 0:
                await asyncio.sleep(self.stream_delay)
            where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
            await self._send_event(send, "response.output_text.delta", **where, delta=piece)
        text = "".join(pieces)
        text_in = chat_usage(messages, text)["prompt_tokens"] if messages else 0
        audio_in = audio_bytes // REALTIME_AUDIO_BYTES_PER_TOKEN
        output = _word_count(text)
        usage = {
            "total_tokens": text_in + audio_in + output,
            "input_tokens": text_in + audio_in,
            "output_tokens": output,
            "input_token_details": {"cached_tokens": 0, "text_tokens": text_in, "audio_tokens": audio_in},
            "output_token_details": {"text_tokens": output, "audio_tokens": 0},
        }
        done = {"id": response_id, "status": "completed", "output": [], "usage": usage}
        await self._send_event(send, "response.done", response=done)

    @staticmethod
    async def _send_event(send: Send, kind: str, **fields: Any) -> None:
        event = {"type": kind, "event_id": "event_" + os.urandom(8).hex(), **fields}
        await send({"type": "websocket.send", "text": json.dumps(event)})

    # ----------------------------------------------------------------- endpoints

    def _models(self, body: bytes) -> Response:
        if self.models is None:
            return _json(200, {"object": "list", "data": MODELS})
        data = [{"id": m, "object": "model", "created": 1715367049, "owned_by": "system"} for m in sorted(self.models)]
        return _json(200, {"object": "list", "data": data})

    def _unknown_model(self, data: dict[str, Any]) -> Response | None:
        model = data.get("model")
        if self.models is None or not isinstance(model, str) or model in self.models:
            return None
        message = f"The model `{model}` does not exist or you do not have access to it."
        return _error(404, message, code="model_not_found")

    def _model(self, model_id: str) -> Response:
        model = MODELS_BY_ID.get(model_id)
        if model is None:
            message = f"The model '{model_id}' does not exist"
            return _error(404, message, param="model", code="model_not_found")
        return _json(200, model)

    def _chat(self, body: bytes) -> Response:
        data = _json_object(body)
        missing = self._unknown_model(data)
        if missing is not None:
            return missing
        model, messages = _validate_chat(data)
        pieces = reply_pieces(messages, self.stream_chunks)
        usage = chat_usage(messages, "".join(pieces))
        base = {
            "id": "chatcmpl-" + os.urandom(12).hex(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.answer_model or model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if data.get("stream") is True:
            return self._chat_stream(base, pieces, usage, data.get("stream_options"), self.faults.stream_fault(body))
        message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": "stop",
        }
        return _json(200, {**base, "choices": [choice], "usage": usage}, OK_RATELIMIT_HEADERS)

    def _chat_stream(
        self,
        base: dict[str, Any],
        pieces: list[str],
        usage: dict[str, int],
        options: Any,
        fault: str | None = None,
    ) -> Response:
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        base = {**base, "object": "chat.completion.chunk"}
        produced = _stream_events(base, pieces, usage if include_usage else None, self.stream_delay, self.usage_delay)
        events = faulty_stream(self._logged(produced), fault, self.faults.first_token_seconds)
        headers = {
            # Given as a header, not media_type: Starlette would append "; charset=utf-8".
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            "x-request-id": _request_id(),
            **OK_RATELIMIT_HEADERS,
        }
        return StreamingResponse(events, headers=headers)

    async def _logged(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        sent: list[bytes] = []
        times: list[float] = []
        if self.record:
            with self._received_lock:
                self.streams.append(sent)
                self.stream_times.append(times)
        async for event in events:
            sent.append(event)
            times.append(time.time())
            yield event

    def _embeddings(self, body: bytes) -> Response:
        data = _json_object(body)
        missing = self._unknown_model(data)
        if missing is not None:
            return missing
        model = _model_of(data)
        if "input" not in data:
            raise BadRequest(
                "Missing required parameter: 'input'.",
                param="input",
                code="missing_required_parameter",
            )
        items = _embedding_inputs(data["input"])
        encoding = data.get("encoding_format") or "float"
        embeddings = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _encode_vector(_vector(item), encoding),
            }
            for i, item in enumerate(items)
        ]
        tokens = sum(_tokens(item) for item in items)
        payload = {
            "object": "list",
            "data": embeddings,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return _json(200, payload, OK_RATELIMIT_HEADERS)

    def _responses(self, body: bytes, response_id: str | None = None) -> Response:
        data = _json_object(body)
        missing = self._unknown_model(data)
        if missing is not None:
            return missing
        model = _model_of(data, "Missing required parameter: 'model'.", "missing_required_parameter")
        messages = response_input_messages(data.get("input"))
        pieces = reply_pieces(messages, self.stream_chunks)
        usage = response_usage(messages, data.get("instructions"), "".join(pieces), model)
        response_id = response_id or "resp_" + os.urandom(24).hex()
        item_id = "msg_" + os.urandom(24).hex()
        base = _response_object(response_id, model, data, "in_progress")
        if data.get("stream") is True:
            events = _response_events(base, item_id, pieces, usage, self.stream_delay)
            headers = {"content-type": "text/event-stream; charset=utf-8", "x-request-id": _request_id()}
            return StreamingResponse(events, headers={**headers, **OK_RATELIMIT_HEADERS})
        item = _message_item(item_id, "".join(pieces), "completed")
        payload = {**base, "status": "completed", "output": [item], "usage": usage}
        return _json(200, payload, OK_RATELIMIT_HEADERS)

    def _completions(self, body: bytes) -> Response:
        data = _json_object(body)
        model = _model_of(data)
        prompt = data.get("prompt")
        prompt_text = prompt if isinstance(prompt, str) else " ".join(p for p in prompt or [] if isinstance(p, str))
        messages = [{"role": "user", "content": prompt_text}]
        pieces = reply_pieces(messages, self.stream_chunks)
        text = "".join(pieces)
        prompt_tokens = _word_count(prompt_text)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _word_count(text),
            "total_tokens": prompt_tokens + _word_count(text),
        }
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}
        payload = {
            "id": "cmpl-" + os.urandom(12).hex(),
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
        return _json(200, payload, OK_RATELIMIT_HEADERS)

    def _moderations(self, body: bytes) -> Response:
        data = _json_object(body)
        inputs = data.get("input")
        if inputs is None:
            raise BadRequest("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
        items = inputs if isinstance(inputs, list) else [inputs]
        categories = ("harassment", "hate", "self-harm", "sexual", "violence")
        result = {
            "flagged": False,
            "categories": dict.fromkeys(categories, False),
            "category_scores": dict.fromkeys(categories, 0.0001),
            "category_applied_input_types": {c: ["text"] for c in categories},
        }
        payload = {
            "id": "modr-" + os.urandom(12).hex(),
            "model": data.get("model") or "omni-moderation-latest",
            "results": [result for _ in items],
        }
        return _json(200, payload, OK_RATELIMIT_HEADERS)

    def _images(self, body: bytes) -> Response:
        data = _json_object(body)
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
        model = data.get("model") or "dall-e-2"
        count = data.get("n") or 1
        if not isinstance(count, int) or not 1 <= count <= 10:
            raise BadRequest(f"{count!r} is not valid for 'n'", param="n")
        payload: dict[str, Any] = {"created": int(time.time())}
        if model.startswith("gpt-image"):
            # GPT Image always answers in base64 and says what it used.
            payload["data"] = [{"b64_json": base64.b64encode(PNG_1X1).decode()} for _ in range(count)]
            words = _word_count(prompt)
            output = IMAGE_TOKENS * count
            payload["usage"] = {
                "input_tokens": words,
                "input_tokens_details": {"text_tokens": words, "image_tokens": 0},
                "output_tokens": output,
                "total_tokens": words + output,
            }
        elif data.get("response_format") == "b64_json":
            payload["data"] = [{"b64_json": base64.b64encode(PNG_1X1).decode(), "revised_prompt": prompt}] * count
        else:
            url = "https://oaidalleapiprodscus.blob.core.windows.net/private/img-fake.png"
            payload["data"] = [{"url": url, "revised_prompt": prompt} for _ in range(count)]
        return _json(200, payload, OK_RATELIMIT_HEADERS)

    def _speech(self, body: bytes) -> Response:
        data = _json_object(body)
        for name in ("model", "input", "voice"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise BadRequest(
                    f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
                )
        media_type = SPEECH_FORMATS.get(data.get("response_format") or "mp3")
        if media_type is None:
            raise BadRequest(f"Invalid response_format {data.get('response_format')!r}", param="response_format")
        audio = speech_bytes(data["input"])

        async def chunks() -> AsyncIterator[bytes]:
            # OpenAI sends speech as it is made: chunked, without a content-length.
            for start in range(0, len(audio), 1024):
                yield audio[start : start + 1024]

        return StreamingResponse(chunks(), headers={"content-type": media_type, "x-request-id": _request_id()})

    def _transcription(self, body: bytes, content_type: str) -> Response:
        fields = form_fields(content_type, body)
        if "file" not in fields or fields["file"][1] is None:
            raise BadRequest("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
        model = fields.get("model", (b"",))[0].decode()
        if not model:
            raise BadRequest("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
        audio = fields["file"][0]
        text = f"The fake upstream heard {len(audio)} bytes of {fields['file'][1]}."
        response_format = fields.get("response_format", (b"json",))[0].decode()
        if response_format == "text":
            return Response(text + "\n", headers={"x-request-id": _request_id()}, media_type="text/plain")
        seconds = max(1, len(audio) // AUDIO_BYTES_PER_SECOND)
        if model == "whisper-1":
            usage: dict[str, Any] = {"type": "duration", "seconds": seconds}
        else:
            audio_tokens, output = seconds * 10, _word_count(text)
            usage = {
                "type": "tokens",
                "input_tokens": audio_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
                "output_tokens": output,
                "total_tokens": audio_tokens + output,
            }
        return _json(200, {"text": text, "usage": usage}, OK_RATELIMIT_HEADERS)


AZURE_INVALID_KEY = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an"
    " active subscription and use a correct regional API endpoint for your resource."
)
AZURE_NO_DEPLOYMENT = (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes,"
    " please wait a moment and try again."
)


def _azure_error(status: int, code: str, message: str) -> Response:
    return _json(status, {"error": {"code": code, "message": message}})


class FakeAzure(FakeUpstream):
    """An Azure OpenAI resource: /openai/deployments/<deployment>/<operation>?api-version=..., the key
    in `api-key` only (an Authorization header is an Entra token it cannot read), and Azure's own
    error bodies. `deployments` maps each deployment to the model it runs."""

    def __init__(self, deployments: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deployments = deployments

    async def _respond(self, request: Request) -> Response:
        at = time.monotonic()
        scope = request.scope
        method, path = scope["method"], scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        body = await request.body()
        headers = _headers(scope)
        key = headers.get("api-key") or None
        self._record(Received(method, path, headers, body, key, at))
        if "authorization" in headers or key is None:
            return _azure_error(401, "401", AZURE_INVALID_KEY)
        if not any(p.startswith("api-version=") and len(p) > 12 for p in query.split("&")):
            return _azure_error(404, "404", "Resource not found")
        behaviour, retry_after = self._keys.take(key)
        if behaviour == "invalid":
            return _azure_error(401, "401", AZURE_INVALID_KEY)
        rejection = _rejection(behaviour, key, retry_after)
        if rejection is not None:
            return rejection
        if method == "GET" and path == "/openai/models":
            data = [{"id": m, "object": "model"} for m in sorted(set(self.deployments.values()))]
            return _json(200, {"object": "list", "data": data})
        parts = path.split("/")  # "", "openai", "deployments", <deployment>, <operation...>
        if len(parts) < 5 or parts[:3] != ["", "openai", "deployments"]:
            return _azure_error(404, "404", "Resource not found")
        deployment, operation = parts[3], "/".join(parts[4:])
        model = self.deployments.get(deployment)
        if model is None:
            return _azure_error(404, "DeploymentNotFound", AZURE_NO_DEPLOYMENT)
        data = _json_object(body) if body else {}
        data["model"] = model  # Azure answers with the model the deployment runs, whatever the body said
        handler = {"chat/completions": self._chat, "embeddings": self._embeddings}.get(operation)
        if handler is None or method != "POST":
            return _azure_error(404, "404", "Resource not found")
        models, self.models = self.models, None
        try:
            return handler(json.dumps(data).encode())
        except BadRequest as exc:
            return _error(400, exc.message, param=exc.param, code=exc.code)
        finally:
            self.models = models


# --------------------------------------------------------------------------- command line


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fake OpenAI API on 127.0.0.1 (tests, benchmarks).")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one")
    parser.add_argument("--stream-chunks", type=int, default=5, help="content chunks per streamed reply")
    parser.add_argument(
        "--stream-delay",
        type=float,
        default=0.0,
        help="seconds between streamed chunks",
    )
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    up = FakeUpstream(stream_chunks=args.stream_chunks, stream_delay=args.stream_delay)
    up.record = False  # nobody reads them across processes; keeps memory flat
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    up.start(port=args.port)
    print(f"READY {up.url}", flush=True)
    try:
        stopping.wait()
    finally:
        up.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
