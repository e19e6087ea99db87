"""Memory stays bounded: bodies have a limit, refusals read no body, headers have a deadline."""

from __future__ import annotations

import json
import select
import socket
import sqlite3

import httpx
import openai
import pytest

from tests.conftest import Keyrotor, wait_for
from tests.fake_upstream import FakeUpstream

GOOD = "sk-good-bounds-aaaaaaaaaaaaaaaaaaaaaaaa-0001"
LIMIT = 1_000_000


def client_for(kr: Keyrotor, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=20)


def statuses(kr: Keyrotor) -> list[int]:
    conn = sqlite3.connect(kr.db_path)
    try:
        return [row[0] for row in conn.execute("SELECT status FROM flows ORDER BY id")]
    finally:
        conn.close()


def read_answer(sock: socket.socket) -> tuple[str, dict]:
    """The status line and JSON body of one HTTP/1.1 answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return lines[0], json.loads(body)


@pytest.fixture
def running(keyrotor: Keyrotor) -> tuple[Keyrotor, str]:
    client_key = keyrotor.start_serving(
        GOOD, proxy_args=("--set", f"proxy.max_body_bytes={LIMIT}", "--set", "proxy.header_timeout_seconds=1")
    )
    return keyrotor, client_key


def test_a_request_without_a_valid_key_is_refused_before_its_body_is_sent(running, upstream: FakeUpstream):
    kr, _ = running
    with socket.create_connection(("127.0.0.1", kr.proxy_port), timeout=10) as sock:
        # 250 MB announced, not one byte of it sent: the answer must not wait for the body.
        sock.sendall(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer kr-unknown-0000000000\r\n"
            b"Content-Length: 250000000\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        status, body = read_answer(sock)
    assert status == "HTTP/1.1 401 Unauthorized"
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
    assert upstream.received == []
    assert wait_for(lambda: statuses(kr), what="the captured refusal") == [401]


def test_a_body_over_the_limit_gets_an_openai_shaped_413(running, upstream: FakeUpstream):
    kr, client_key = running
    client = client_for(kr, client_key)
    big = [{"role": "user", "content": "x" * (LIMIT + 1)}]
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=big)
    assert raised.value.status_code == 413
    assert raised.value.code == "request_too_large" and raised.value.type == "invalid_request_error"
    assert raised.value.response.headers["x-should-retry"] == "false"

    # Without Content-Length (chunked), the limit holds while the body arrives.
    def chunks():
        for _ in range(3 * LIMIT // 65536):
            yield b"y" * 65536

    response = httpx.post(
        f"{kr.base_url}/chat/completions", headers={"authorization": f"Bearer {client_key}"}, content=chunks()
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    small = [{"role": "user", "content": "x" * (LIMIT // 2)}]
    assert client.chat.completions.create(model="gpt-4o-mini", messages=small).choices
    assert len(upstream.received) == 1
    assert wait_for(lambda: len(s := statuses(kr)) == 3 and s, what="3 captured rows") == [413, 413, 200]


def test_a_connection_that_never_finishes_its_headers_is_closed(running):
    kr, client_key = running
    with socket.create_connection(("127.0.0.1", kr.proxy_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")

        def closed() -> bool:
            try:
                sock.sendall(b"X-Slow: 1\r\n")  # a line now and then keeps mitmproxy's own idle timer happy
            except (BrokenPipeError, ConnectionResetError):
                return True
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1) == b""

        wait_for(closed, timeout=10, interval=0.2, what="the proxy to close the connection")
    # A client that does send its headers is unaffected, on a connection kept alive in between.
    with httpx.Client(base_url=kr.base_url, headers={"authorization": f"Bearer {client_key}"}) as client:
        assert client.get("/models").status_code == 200
        assert client.get("/models").status_code == 200
