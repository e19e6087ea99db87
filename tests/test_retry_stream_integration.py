"""Retried answers stream (issue 20 §5), end to end: the official openai client → a real mitmproxy
running keyrotor → the fake upstream.

The first attempt fails (a key answering 500, or silent), the retry's stream is fed to the client
through mitmproxy's own stream as upstream sends it (addons/retry_stream.py). Times are compared
between the fake upstream's send times and the client's arrival times, never against fixed timers:
what the test asserts is order (the client has a chunk before upstream sent the next), not speed.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from tests.conftest import Keyrotor, raw_chat_request, stored_flows, wait_for
from tests.fake_upstream import FakeUpstream

BAD = "sk-good-retry-" + "a" * 24 + "0001"  # answers 500, or never, as a test sets it
GOOD = "sk-good-retry-" + "b" * 24 + "0002"
THIRD = "sk-good-retry-" + "c" * 24 + "0003"
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "hello"}]
PACE = 0.3  # seconds between the fake upstream's chunks


def client_for(kr: Keyrotor, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=30)


def started(kr: Keyrotor, *settings: str, keys: tuple[str, ...] = (BAD, GOOD)) -> openai.OpenAI:
    # round_robin from the first key: the bad one is always the first attempt.
    args = ("--set", "keypool.strategy=round_robin", *(item for s in settings for item in ("--set", s)))
    return client_for(kr, kr.start_serving(*keys, proxy_args=args))


def streamed(client: openai.OpenAI, **extra) -> list[tuple[float, object]]:
    """Each chunk the client got, with the time it got it."""
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **extra)  # type: ignore[arg-type]
    return [(time.time(), chunk) for chunk in stream]


def rows(kr: Keyrotor, count: int = 1) -> list[dict]:
    return wait_for(lambda: len(found := stored_flows(kr.db_path)) >= count and found, what=f"{count} rows")


def test_a_retried_stream_reaches_the_client_as_upstream_sends_it(keyrotor: Keyrotor, upstream: FakeUpstream):
    upstream.set_key(BAD, "server_error")
    upstream.stream_delay = PACE
    client = started(keyrotor)
    got = streamed(client, stream_options={"include_usage": True})
    assert upstream.keys_seen() == [BAD, GOOD]  # the stream is the retry's
    (sent,) = upstream.stream_times
    content = [at for at, chunk in got if chunk.choices and chunk.choices[0].delta.content]
    assert len(content) == upstream.stream_chunks >= 5
    # Each content chunk (upstream's events 1..n, PACE apart) reached the client before upstream sent
    # the next: the client did not wait for the whole answer.
    for index, arrived in enumerate(content[:-1], start=1):
        assert arrived < sent[index + 1], (index, arrived - sent[index], sent[index + 1] - sent[index])
    assert content[0] < sent[-1] - 3 * PACE  # the first token long before the last was sent
    assert got[-1][1].usage is not None and got[-1][1].usage.completion_tokens > 0  # asked for, so kept

    (row,) = rows(keyrotor)
    assert row["status"] == 200 and row["attempts"] == 2 and row["error"] is None
    assert row["completion_tokens"] > 0 and row["prompt_tokens"] > 0
    body = row["response_body"]
    assert body.count("data: ") == len(upstream.streams[0]) and body.rstrip().endswith("data: [DONE]")
    times = json.loads(row["chunk_times"])  # [[ms since the first byte, bytes], ...]: spread as it came
    assert len(times) >= upstream.stream_chunks and times[-1][0] >= 3 * PACE * 1000
    assert row["first_byte_at"] < sent[2]  # the client's first byte, not the retry's end
    attempts = keyrotor.query("SELECT status, upstream_key_id FROM attempts ORDER BY id")
    assert [a["status"] for a in attempts] == [500, 200]


def test_a_retried_stream_hides_its_usage_chunk_from_a_client_that_did_not_ask(
    keyrotor: Keyrotor, upstream: FakeUpstream
):
    upstream.set_key(BAD, "server_error")
    client = started(keyrotor)
    got = streamed(client)
    assert all(chunk.usage is None for _, chunk in got)  # keyrotor asked upstream for it, the client did not
    assert '"stream_options"' in upstream.received[-1].body.decode()
    (row,) = rows(keyrotor)
    assert row["status"] == 200 and row["completion_tokens"] > 0  # counted all the same
    assert row["cost"] > 0


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_a_key_echoed_in_a_retried_stream_is_replaced(keyrotor: Keyrotor, upstream: FakeUpstream, encoding: str):
    upstream.set_key(BAD, "server_error")
    upstream.set_key(GOOD, f"echo_stream_{encoding}")  # quotes its key, cut between compressed pieces
    client = started(keyrotor)
    got = streamed(client)
    reply = "".join(chunk.choices[0].delta.content or "" for _, chunk in got if chunk.choices)
    stand_in = "[upstream key #2 ...0002]"
    assert reply == f"You sent {stand_in}, yes {stand_in}."
    (row,) = rows(keyrotor)
    assert stand_in in row["response_body"] and GOOD not in repr(row)
    assert GOOD not in keyrotor.logs()


def test_a_retried_stream_without_its_first_token_in_time_goes_to_a_third_attempt(
    keyrotor: Keyrotor, upstream: FakeUpstream
):
    upstream.set_key(BAD, "server_error")
    upstream.set_key(GOOD, "hang_after_headers")  # 200, text/event-stream, then nothing
    client = started(keyrotor, "keypool.first_token_seconds=1", keys=(BAD, GOOD, THIRD))
    began = time.monotonic()
    got = streamed(client)
    assert got[-1][1].choices[0].finish_reason == "stop"
    assert time.monotonic() - began < 10  # given up after 1 s, not after attempt_timeout_seconds (600)
    assert upstream.keys_seen() == [BAD, GOOD, THIRD]
    (row,) = rows(keyrotor)
    assert row["status"] == 200 and row["attempts"] == 3
    errors = [a["error"] for a in keyrotor.query("SELECT error FROM attempts ORDER BY id")]
    assert errors[0] is None and "first token" in errors[1] and errors[2] is None


def test_a_retried_stream_cut_midway_ends_with_an_error_event_and_is_not_retried(
    keyrotor: Keyrotor, upstream: FakeUpstream
):
    upstream.set_key(BAD, "server_error")
    client = started(keyrotor, keys=(BAD, GOOD, THIRD))
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "#fault:stream_cut"}],  # breaks off after two events
        stream=True,
    )
    got = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 2  # what reached the client stays; the break is said in the stream
    assert raised.value.code == "upstream_stream_interrupted"
    assert upstream.keys_seen() == [BAD, GOOD]  # not sent again once bytes reached the client
    (row,) = rows(keyrotor)
    assert row["status"] == 200 and "broke off" in row["error"]
    assert row["attempts"] == 2


def streaming_request(client_key: str) -> bytes:
    """A streamed chat request as the bytes an HTTP/1.1 client sends (tests/conftest.py's, streamed)."""
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "stream": True}).encode()
    head, _, _ = raw_chat_request(client_key, MODEL).partition(b"\r\n\r\n")
    head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.startswith(b"Content-Length"))
    return head + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def test_a_client_that_hangs_up_during_a_retried_stream(keyrotor: Keyrotor, upstream: FakeUpstream):
    upstream.set_key(BAD, "server_error")
    upstream.stream_chunks, upstream.stream_delay = 20, PACE  # six seconds of stream
    client_key = keyrotor.start_serving(BAD, GOOD, proxy_args=("--set", "keypool.strategy=round_robin"))
    with socket.create_connection(("127.0.0.1", keyrotor.proxy_port)) as conn:
        conn.sendall(streaming_request(client_key))
        received = b""
        while received.count(b"data: ") < 3:
            data = conn.recv(65536)
            assert data, received
            received += data
    # Hung up after three events of a retried stream: upstream is read no more, the row says so.
    assert received.startswith(b"HTTP/1.1 200")
    (row,) = rows(keyrotor)
    assert "client" in (row["error"] or "").lower(), row["error"]
    assert row["status"] == 200 and row["first_byte_at"] is not None  # it got the start of the stream
    assert 3 <= row["response_body"].count("data: ") < upstream.stream_chunks
    (sent,) = upstream.streams
    assert len(sent) < upstream.stream_chunks  # upstream was no longer read, so it stopped sending
    # The key is free again: the next request is served at once.
    client = client_for(keyrotor, client_key)
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES).choices[0].message.content  # type: ignore[arg-type]


def test_a_stream_retried_after_a_silent_first_attempt_streams_too(keyrotor: Keyrotor, upstream: FakeUpstream):
    upstream.set_key(BAD, "hang")
    upstream.stream_delay = PACE
    client = started(keyrotor, "keypool.attempt_timeout_seconds=1")
    got = streamed(client)
    assert upstream.keys_seen() == [BAD, GOOD]
    (sent,) = upstream.stream_times
    content = [at for at, chunk in got if chunk.choices and chunk.choices[0].delta.content]
    assert content[0] < sent[2] and content[0] < sent[-1] - 3 * PACE
    (row,) = rows(keyrotor)
    assert row["status"] == 200 and row["attempts"] == 2 and row["error"] is None


def test_mitmweb_never_shows_the_key_of_a_retried_stream(keyrotor: Keyrotor, upstream: FakeUpstream):
    from tests.conftest import ADMIN_KEY
    from tests.test_secrets_integration import Updates

    upstream.set_key(BAD, "server_error")
    upstream.set_key(GOOD, "echo_stream_gzip")  # the retry's stream quotes its key
    keyrotor.env["KEYROTOR_KEYPOOL_STRATEGY"] = "round_robin"
    client_key, web_port = keyrotor.start_with_mitmweb(BAD, GOOD)
    updates = Updates(web_port)
    try:
        got = streamed(client_for(keyrotor, client_key))
        assert upstream.keys_seen() == [BAD, GOOD]
        assert "[upstream key #2 ...0002]" in "".join(c.choices[0].delta.content or "" for _, c in got if c.choices)
        wait_for(lambda: len(updates.flows_finished()) == 1, what="the flow finished on /updates")
        mitmweb = f"http://127.0.0.1:{web_port}"
        flows = httpx.get(f"{mitmweb}/flows", params={"token": ADMIN_KEY}).json()
        seen = ["\n".join(updates.messages), json.dumps(flows)]
        seen.append(httpx.get(f"{mitmweb}/flows/dump", params={"token": ADMIN_KEY}).content.decode("latin-1"))
        for part in ("request", "response"):
            url = f"{mitmweb}/flows/{flows[0]['id']}/{part}/content.data"
            seen.append(httpx.get(url, params={"token": ADMIN_KEY}).content.decode("latin-1"))
    finally:
        updates.close()
    everything = "\n".join(seen)
    assert "[upstream key #2 ...0002]" in everything  # the placeholder, shown
    for secret in (BAD, GOOD, client_key):
        assert secret not in everything
