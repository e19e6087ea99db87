"""A local stand-in for the OpenAI API, for `run.py demo`: keyrotor can be tried without an API key.

It answers `GET /v1/models`, `POST /v1/chat/completions` (streamed or not, with usage, and the usage
chunk when `stream_options.include_usage` asks for it) and `POST /v1/embeddings` in OpenAI's shapes,
on 127.0.0.1 only. Keys starting with `sk-demo-` are accepted; any other gets OpenAI's 401. The answers
are made up ("Hello from the fake upstream. …"), and so are their token counts: nothing leaves the machine.

The tests' fuller fake (tests/fake_upstream.py) takes its replies and token counts from here.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

HOST = "127.0.0.1"
KEY_PREFIX = "sk-demo-"
# Tokens charged per chat message on top of its words (role, separators).
TOKENS_PER_MESSAGE = 7
CHAT_MODELS = ("gpt-4o-mini", "gpt-4o")
EMBEDDING_MODELS = ("text-embedding-3-small",)
EMBEDDING_DIMENSIONS = 8


def text_of(content: Any) -> str:
    """The text of a message content: a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def word_count(text: str) -> int:
    return len(text.split())


def reply_pieces(messages: list[Any], chunks: int) -> list[str]:
    """The assistant reply, cut into the pieces a stream sends.

    The non-streamed reply is the concatenation of the same pieces, so both
    modes always give identical text. At least one piece is produced.
    """
    last_user = next(
        (m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
        {},
    )
    count = max(1, chunks)
    n = word_count(text_of(last_user.get("content")))
    words = f"Hello from the fake upstream. Your last message had {n} words.".split()
    # Pad so every streamed chunk carries at least one word.
    words += [f"word{i}" for i in range(len(words) + 1, count + 1)]
    size, extra = divmod(len(words), count)
    pieces: list[str] = []
    start = 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        pieces.append(" ".join(words[start:end]) + (" " if i < count - 1 else ""))
        start = end
    return pieces


def chat_usage(messages: list[Any], reply: str) -> dict[str, int]:
    """Made-up but consistent token counts: words, plus TOKENS_PER_MESSAGE per message."""
    prompt = sum(word_count(text_of(m.get("content"))) + TOKENS_PER_MESSAGE for m in messages if isinstance(m, dict))
    completion = word_count(reply)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _json(payload: dict[str, Any]) -> Response:
    return Response(json.dumps(payload), media_type="application/json")


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class DemoUpstream:
    """The stand-in API, served by uvicorn in a background thread: `DemoUpstream().start()`, then `.url`."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay  # seconds before each answer and between streamed chunks, so latency is not zero
        self.url = ""
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, port: int = 0, timeout: float = 10.0) -> DemoUpstream:
        """Serve on 127.0.0.1:`port` (0: a free one); returns once connections are accepted."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        self.port = sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        config = uvicorn.Config(self._asgi, interface="asgi3", lifespan="off", log_level="warning", access_log=False)
        config.timeout_graceful_shutdown = 1  # a stream left open never holds up the demo's stop
        server = self._server = uvicorn.Server(config)

        def serve() -> None:
            # Our own loop in this thread: uvicorn's run() would take over the process's signals.
            try:
                asyncio.run(server.serve(sockets=[sock]))
            finally:
                sock.close()

        self._thread = threading.Thread(target=serve, name="demo-upstream", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the demo upstream could not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._server = self._thread = None

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self._respond(request)
        await response(scope, receive, send)

    async def _respond(self, request: Request) -> Response:
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not key.startswith(KEY_PREFIX):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        method, path = request.method, request.url.path
        if (method, path) == ("GET", "/v1/models"):
            models = [*CHAT_MODELS, *EMBEDDING_MODELS]
            data = [{"id": m, "object": "model", "created": 1721172741, "owned_by": "demo"} for m in models]
            return _json({"object": "list", "data": data})
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/embeddings"):
            return _error(404, f"Invalid URL ({method} {path})", "invalid_request_error")
        try:
            data = json.loads(await request.body())
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        if not isinstance(data, dict):
            return _error(400, "The body must be a JSON object.", "invalid_request_error")
        model = data.get("model")
        served = CHAT_MODELS if path.endswith("completions") else EMBEDDING_MODELS
        if not isinstance(model, str) or model not in served:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return _error(404, message, "invalid_request_error", "model_not_found")
        await asyncio.sleep(self.delay * random.uniform(1, 4))
        if path == "/v1/embeddings":
            return self._embeddings(data, model)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "Missing required parameter: 'messages'.", "invalid_request_error", param="messages")
        return self._chat(data, model, messages)

    def _chat(self, data: dict[str, Any], model: str, messages: list[Any]) -> Response:
        pieces = reply_pieces(messages, 5)
        usage = chat_usage(messages, "".join(pieces))
        base = {"id": "chatcmpl-" + os.urandom(12).hex(), "created": int(time.time()), "model": model}
        if not data.get("stream"):
            message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            return _json({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        options = data.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        events = self._events(base, pieces, usage if with_usage else None)
        return StreamingResponse(events, media_type="text/event-stream")

    async def _events(
        self, base: dict[str, Any], pieces: list[str], usage: dict[str, int] | None
    ) -> AsyncIterator[bytes]:
        chunk = {**base, "object": "chat.completion.chunk"}

        def event(delta: dict[str, Any], finish: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**chunk, "choices": [choice], **({"usage": None} if usage else {})})

        yield event({"role": "assistant", "content": ""}, None)
        for piece in pieces:
            await asyncio.sleep(self.delay)
            yield event({"content": piece}, None)
        yield event({}, "stop")
        if usage:
            yield _sse({**chunk, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    @staticmethod
    def _embeddings(data: dict[str, Any], model: str) -> Response:
        raw = data.get("input")
        inputs = raw if isinstance(raw, list) else [raw]
        vectors = [
            {"object": "embedding", "index": i, "embedding": [random.random() for _ in range(EMBEDDING_DIMENSIONS)]}
            for i in range(len(inputs))
        ]
        tokens = sum(word_count(item) if isinstance(item, str) else 1 for item in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return _json({"object": "list", "data": vectors, "model": model, "usage": usage})
