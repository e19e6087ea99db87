"""A client is never cut while its request is alive, and its row says what it got (issue 20 §3).

The official openai client (or a raw socket that hangs up) → a real mitmproxy running keyrotor →
the fake upstream: one key never answers (1 s attempt timeout), the next is rate limited with a
Retry-After of 3 s, then answers. Small settings keep that retry chain (about 4 s) longer than
keyrotor's own request-header deadline (2 s) and the test short. (Two keys silent for the same
request make it the request's fault, and retries stop: core/dispatch.py's suspect rule.)
"""

from __future__ import annotations

import socket

import openai

from tests.conftest import Keyrotor, raw_chat_request, wait_for
from tests.fake_upstream import FakeUpstream

SILENT = "sk-silent-alive-" + "a" * 24 + "0001"
LIMITED = "sk-good-alive-" + "b" * 24 + "0002"
MODEL = "gpt-4o-mini"
SETTINGS = (
    "proxy.header_timeout_seconds=2",
    "keypool.attempt_timeout_seconds=1",
    "keypool.max_attempts=5",
    "keypool.wait_max_seconds=10",
)


def started(kr: Keyrotor, upstream: FakeUpstream) -> str:
    upstream.set_key(SILENT, "hang")
    upstream.set_key(LIMITED, "ratelimit", times=1, retry_after="3")
    return kr.start_serving(SILENT, LIMITED, proxy_args=tuple(item for s in SETTINGS for item in ("--set", s)))


def chats(upstream: FakeUpstream) -> list:
    return [r for r in upstream.received if r.path == "/v1/chat/completions"]


def test_a_retry_chain_longer_than_the_header_deadline_keeps_its_client(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = started(keyrotor, upstream)
    client = openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, max_retries=0, timeout=30)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content
    (row,) = wait_for(lambda: keyrotor.query("SELECT status, error, attempts, started_at, ended_at FROM flows"))
    assert row["status"] == 200 and row["error"] is None
    assert row["attempts"] == 3  # silent, rate limited, answered after its Retry-After
    assert row["ended_at"] - row["started_at"] > 3  # longer than the header deadline


def test_a_client_that_hangs_up_mid_retry_is_recorded_as_cut(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = started(keyrotor, upstream)
    with socket.create_connection(("127.0.0.1", keyrotor.proxy_port)) as conn:
        conn.sendall(raw_chat_request(client_key, MODEL))
        wait_for(lambda: len(chats(upstream)) >= 2, what="a retry under way")
    # The client has hung up while the key pool waits out the Retry-After: it gets nothing, though
    # the row once said it got upstream's 429 (or a later attempt's 200).
    (row,) = wait_for(lambda: keyrotor.query("SELECT status, error, first_byte_at FROM flows"), timeout=15)
    assert row["status"] != 200, dict(row)
    assert row["status"] is None and row["first_byte_at"] is None, dict(row)
    assert "client" in row["error"].lower(), dict(row)
