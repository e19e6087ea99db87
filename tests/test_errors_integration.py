"""Every error keyrotor answers itself is OpenAI-shaped JSON, never mitmproxy's HTML page, through a real mitmproxy."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.conftest import Keyrotor
from tests.fake_upstream import FakeUpstream

KEY = "sk-good-errors-aaaaaaaaaaaaaaaaaaaaaa-0001"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_shaped(status: int, headers: dict[str, str], body: bytes, expected_status: int) -> dict:
    assert status == expected_status, body
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert {"message", "type", "code"} <= error.keys() and error["message"] and error["code"], error
    return error


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request sent as raw bytes (what no HTTP client would send), and the answer read until the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n{}",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"GET /v1/models HTTP/1.1 extra words\r\nHost: x\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["bad-content-length", "two-content-lengths", "bad-request-line", "garbage"],
)
def test_a_malformed_request_is_answered_with_a_json_400(keyrotor: Keyrotor, request_bytes: bytes):
    keyrotor.start_serving(KEY)
    assert keyrotor.proxy_port is not None
    error = assert_openai_shaped(*raw_exchange(keyrotor.proxy_port, request_bytes), 400)
    assert error["code"] == "malformed_request" and error["type"] == "invalid_request_error"


def test_an_unreachable_upstream_is_a_json_502(keyrotor: Keyrotor):
    keyrotor.add_keys(KEY)
    client_key = keyrotor.add_client()
    keyrotor.upstream_url = "http://127.0.0.1:9"  # discard port: nothing listens
    keyrotor.start_proxy()
    answer = httpx.post(
        f"{keyrotor.base_url}/chat/completions", json=CHAT, headers={"authorization": f"Bearer {client_key}"}
    )
    error = assert_openai_shaped(answer.status_code, dict(answer.headers), answer.content, 502)
    assert error["code"] == "upstream_error" and error["type"] == "server_error"


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [("hang", "upstream_timeout"), ("hang_after_headers", "upstream_timeout"), ("disconnect", "upstream_error")],
)
def test_an_attempt_that_times_out_or_breaks_off_is_a_json_502(
    keyrotor: Keyrotor, upstream: FakeUpstream, behaviour: str, code: str
):
    upstream.set_key(KEY, behaviour)
    client_key = keyrotor.start_serving(
        KEY, proxy_args=("--set", "keypool.attempt_timeout_seconds=1", "--set", "keypool.max_attempts=1")
    )
    body = {**CHAT, "stream": behaviour == "hang_after_headers"}
    answer = httpx.post(
        f"{keyrotor.base_url}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {client_key}"},
        timeout=30,
    )
    error = assert_openai_shaped(answer.status_code, dict(answer.headers), answer.content, 502)
    assert error["code"] == code, error
    assert answer.headers["x-keyrotor-error"] == code
