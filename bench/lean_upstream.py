"""A fake OpenAI upstream that costs as little CPU as Python can: canned answers, no parsing beyond framing.

    python bench/lean_upstream.py [--port 0]

prints ``READY http://127.0.0.1:<port>`` once it accepts connections and runs until SIGTERM.
For throughput benches (bench/workers.py), where tests/fake_upstream.py (uvicorn + Starlette,
validating every request) would take a large share of the machine's cores away from the proxy
being measured. One asyncio.Protocol per HTTP/1.1 keep-alive connection (uvloop when
installed): it frames each request by its Content-Length and answers

- ``GET /v1/models``: a list of four models;
- anything else: one chat completion (``chat.completion`` with usage), whatever was asked.

It checks nothing: neither the key nor the body. Not for tests, which need the full fake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import cast

MODELS = json.dumps(
    {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 1721172741, "owned_by": "system"}
            for name in ("gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo", "text-embedding-3-small")
        ],
    }
).encode()
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-lean0000000000000000000000",
        "object": "chat.completion",
        "created": 1796622410,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_leanupstream",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the lean upstream.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
    }
).encode()


def answer(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req_lean\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


MODELS_ANSWER = answer(MODELS)
COMPLETION_ANSWER = answer(COMPLETION)


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : stop if stop >= 0 else len(lower)])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            assert self.transport is not None
            self.transport.write(MODELS_ANSWER if head.startswith(b"GET /v1/models") else COMPLETION_ANSWER)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Connection, "127.0.0.1", port, backlog=1024)
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    print(f"READY http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await stopped.wait()
    server.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port))
    else:
        uvloop.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
