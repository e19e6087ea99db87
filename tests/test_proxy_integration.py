"""End to end: the official openai client → a real mitmproxy running keyrotor → the fake upstream."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import openai
import pytest

from tests.conftest import Keyrotor, raises, stored_flows, wait_for
from tests.fake_upstream import FakeUpstream

GOOD = ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-bbbbbbbbbbbbbbbbbbbbbbbbbbbb0002"]
INVALID = "sk-revoked-cccccccccccccccccccccccc0003"
MESSAGES = [{"role": "user", "content": "Say hello to the proxy"}]


def client_for(kr: Keyrotor, key: str) -> openai.OpenAI:
    # max_retries=0: the SDK must not hide what the proxy did.
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=20)


def rows(kr: Keyrotor) -> list[dict]:
    """Every flow as storage's readers get it (headers and bodies unpacked), oldest first."""
    return stored_flows(kr.db_path)


def wait_rows(kr: Keyrotor, count: int) -> list[sqlite3.Row]:
    return wait_for(lambda: (r := rows(kr)) and len(r) >= count and r, what=f"{count} captured rows")


@pytest.fixture
def running(keyrotor: Keyrotor) -> tuple[Keyrotor, str]:
    client_key = keyrotor.start_serving(*GOOD)
    return keyrotor, client_key


def test_upstream_sees_only_pooled_keys_rotated(running, upstream: FakeUpstream):
    kr, client_key = running
    client = client_for(kr, client_key)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    client.models.list()
    client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])

    seen = upstream.keys_seen()
    assert len(seen) == 4
    assert client_key not in seen
    assert seen == [GOOD[0], GOOD[1], GOOD[0], GOOD[1]]  # round robin


def test_azure_style_api_key_header_is_replaced(running, upstream: FakeUpstream):
    kr, client_key = running
    response = httpx.get(f"{kr.base_url}/models", headers={"api-key": client_key})
    assert response.status_code == 200
    assert upstream.received[-1].headers["api-key"] in GOOD
    assert "authorization" not in upstream.received[-1].headers


def test_streamed_chunks_reach_the_client_as_they_are_produced(running, upstream: FakeUpstream):
    kr, client_key = running
    upstream.stream_chunks, upstream.stream_delay = 4, 0.3
    arrivals = []
    text = ""
    for chunk in client_for(kr, client_key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            text += chunk.choices[0].delta.content
    assert len(arrivals) == 4
    # Upstream spaces the chunks 0.3 s apart; a buffering proxy would deliver them together.
    assert arrivals[-1] - arrivals[0] >= 0.6
    assert text.startswith("Hello from the fake upstream.")


def test_missing_or_unknown_client_key_is_rejected_before_upstream(running, upstream: FakeUpstream):
    kr, _ = running
    for key in ("kr-not-a-key-we-issued", GOOD[0]):  # an upstream key is not a client key either
        with pytest.raises(openai.AuthenticationError) as raised:
            client_for(kr, key).models.list()
        assert raised.value.status_code == 401
        assert raised.value.code == "invalid_api_key"
    response = httpx.post(f"{kr.base_url}/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"
    assert upstream.received == []
    captured = wait_rows(kr, 3)
    assert [r["status"] for r in captured] == [401, 401, 401]
    assert all(r["upstream_key_id"] is None for r in captured)


def test_invalid_key_gets_no_more_traffic(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = keyrotor.start_serving(INVALID, GOOD[0])
    client = client_for(keyrotor, client_key)
    outcomes = []
    for _ in range(8):
        try:
            client.models.list()
            outcomes.append("ok")
        except openai.AuthenticationError:
            outcomes.append("401")
    assert outcomes == ["ok"] * 8  # the bad attempt was retried on the good key before the client saw it
    assert upstream.keys_seen().count(INVALID) == 1
    listing = wait_for(lambda: "invalid" in (out := keyrotor.cli("keys", "list").stdout) and out)
    assert "401 invalid_api_key" in listing


def test_rate_limited_key_is_skipped_until_retry_after(running, upstream: FakeUpstream):
    kr, client_key = running
    upstream.set_key(GOOD[1], "ratelimit", times=1, retry_after="2")
    client = client_for(kr, client_key)
    client.models.list()  # GOOD[0]
    client.models.list()  # GOOD[1] → 429, cooling for 2 s; retried on GOOD[0]
    assert upstream.keys_seen()[-2:] == [GOOD[1], GOOD[0]]
    limited_at = upstream.received[-2].at

    def second_key_back() -> bool:
        client.models.list()
        return upstream.keys_seen()[-1] == GOOD[1]

    wait_for(second_key_back, timeout=10, interval=0.1, what="the rate-limited key to return")
    after_429 = [r for r in upstream.received if r.at > limited_at]
    assert [r.key for r in after_429[:-1]] == [GOOD[0]] * (len(after_429) - 1)
    assert after_429[-1].at - limited_at >= 1.9  # not before its Retry-After


def test_no_key_configured_gives_503_that_says_not_to_retry(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = keyrotor.add_client()
    keyrotor.start_proxy()
    response = httpx.get(f"{keyrotor.base_url}/models", headers={"authorization": f"Bearer {client_key}"})
    assert response.status_code == 503
    assert response.headers["x-should-retry"] == "false" and "retry-after" not in response.headers
    assert response.json()["error"]["code"] == "no_upstream_key_configured"
    assert upstream.received == []


def test_key_added_while_running_serves_the_next_request(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = keyrotor.add_client()
    keyrotor.start_proxy()
    client = client_for(keyrotor, client_key)
    with pytest.raises(openai.InternalServerError):
        client.models.list()
    keyrotor.add_keys(GOOD[0])

    wait_for(lambda: raises(client.models.list) is None, timeout=3, interval=0.05, what="the new key to be used")
    assert upstream.keys_seen() == [GOOD[0]]


def test_disabled_client_is_refused_without_restart(running, upstream: FakeUpstream):
    kr, client_key = running
    client = client_for(kr, client_key)
    client.models.list()
    kr.cli("clients", "disable", "alice")

    wait_for(
        lambda: isinstance(raises(client.models.list), openai.AuthenticationError),
        timeout=3,
        interval=0.05,
        what="the disabled client to be refused",
    )


def test_rows_hold_what_design_says(running, upstream: FakeUpstream):
    kr, client_key = running
    client = client_for(kr, client_key)
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        if c.choices
    )
    first, second = wait_rows(kr, 2)

    assert (first["method"], first["path"], first["status"], first["model"], first["stream"]) == (
        "POST",
        "/v1/chat/completions",
        200,
        "gpt-4o-mini",
        0,
    )
    assert (first["prompt_tokens"], first["completion_tokens"], first["total_tokens"]) == (
        plain.usage.prompt_tokens,
        plain.usage.completion_tokens,
        plain.usage.total_tokens,
    )
    assert plain.choices[0].message.content in first["response_body"]
    assert '"Say hello to the proxy"' in first["request_body"]

    assert (second["model"], second["stream"], second["status"]) == ("gpt-4o", 1, 200)
    assert second["total_tokens"] and second["prompt_tokens"] == first["prompt_tokens"]
    assert second["response_body"].count("data: ") >= 7 and "[DONE]" in second["response_body"]
    assert streamed == plain.choices[0].message.content

    for row in (first, second):
        assert row["started_at"] <= row["first_byte_at"] <= row["ended_at"]
        assert row["client_key_id"] == 1 and row["upstream_key_id"] in (1, 2) and row["attempts"] == 1
        assert row["client_addr"] == "127.0.0.1" and row["error"] is None
        sent = {name.lower(): value for name, value in json.loads(row["request_headers"])}
        assert sent["authorization"] == "[redacted]"
        assert "content-type" in row["response_headers"]
    assert first["upstream_key_id"] != second["upstream_key_id"]


def test_full_text_search_finds_bodies(running):
    kr, client_key = running
    client_for(kr, client_key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "xylophone quartz"}]
    )
    wait_rows(kr, 1)
    conn = sqlite3.connect(kr.db_path)
    hits = conn.execute("SELECT rowid FROM flows_fts WHERE flows_fts MATCH 'xylophone'").fetchall()
    conn.close()
    assert len(hits) == 1


def test_no_secret_in_database_file_or_logs(running, upstream: FakeUpstream):
    kr, client_key = running
    client = client_for(kr, client_key)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    httpx.get(f"{kr.base_url}/models", headers={"api-key": client_key})
    wait_rows(kr, 3)
    kr.cli("keys", "list")
    kr.stop()  # flush and checkpoint, so the WAL is folded into the file too

    stored = b"".join(
        p.read_bytes() for p in kr.tmp.iterdir() if p.name.startswith("keyrotor.db") and p.suffix != ".secret"
    )
    logs = kr.logs().encode()
    unpacked = repr(rows(kr))  # headers and bodies are compressed in the file: also what readers get
    for secret in (*GOOD, client_key):
        assert secret.encode() not in stored, "a key value is stored in clear"
        assert secret not in unpacked, "a key value is stored"
        assert secret.encode() not in logs, "a key value was logged"
    assert len(upstream.keys_seen()) == 3  # the traffic really went through


def test_client_disconnect_mid_stream_is_recorded(running, upstream: FakeUpstream):
    kr, client_key = running
    upstream.stream_chunks, upstream.stream_delay = 6, 0.3
    with httpx.stream(
        "POST",
        f"{kr.base_url}/chat/completions",
        headers={"authorization": f"Bearer {client_key}"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
        timeout=10,
    ) as response:
        next(response.iter_raw())  # the first piece, then hang up
    (row,) = wait_rows(kr, 1)
    assert row["status"] == 200 and row["stream"] == 1
    assert row["error"], "a stream the client abandoned must say so"
    assert row["response_body"].startswith("data: ")


def test_unreachable_upstream_gives_502_and_a_row(keyrotor: Keyrotor):
    keyrotor.add_keys(GOOD[0])
    client_key = keyrotor.add_client()
    keyrotor.upstream_url = "http://127.0.0.1:9"  # discard port: nothing listens
    keyrotor.start_proxy()
    response = httpx.get(f"{keyrotor.base_url}/models", headers={"authorization": f"Bearer {client_key}"})
    assert response.status_code == 502
    (row,) = wait_rows(keyrotor, 1)
    assert row["error"] and row["upstream_key_id"] == 1


def test_streams_have_token_counts_though_the_client_did_not_ask(running, upstream: FakeUpstream):
    kr, client_key = running
    client = client_for(kr, client_key)
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))

    assert chunks and all(chunk.choices for chunk in chunks), "a client that did not ask got a usage-only chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert json.loads(upstream.received[-1].body)["stream_options"] == {"include_usage": True}
    _, streamed = wait_rows(kr, 2)
    assert (streamed["stream"], streamed["prompt_tokens"], streamed["completion_tokens"], streamed["total_tokens"]) == (
        1,
        plain.usage.prompt_tokens,
        plain.usage.completion_tokens,
        plain.usage.total_tokens,
    )
    assert '"choices": [], "usage": {' in streamed["response_body"]  # the row keeps what upstream sent


def test_a_client_that_asked_for_usage_still_gets_its_usage_chunk(running, upstream: FakeUpstream):
    kr, client_key = running
    chunks = list(
        client_for(kr, client_key).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    usage_only = [c for c in chunks if not c.choices]
    assert len(usage_only) == 1 and chunks[-1] is usage_only[0]
    assert usage_only[0].usage.total_tokens > 0
    assert json.loads(upstream.received[-1].body)["stream_options"] == {"include_usage": True}
    (row,) = wait_rows(kr, 1)
    assert row["total_tokens"] == usage_only[0].usage.total_tokens


def test_a_retried_stream_has_no_usage_chunk_either(running, upstream: FakeUpstream):
    kr, client_key = running
    upstream.set_key(GOOD[0], "ratelimit", times=1, retry_after="1")
    client = client_for(kr, client_key)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))

    assert upstream.keys_seen() == GOOD  # the 429 was retried on the other key, the answer delivered whole
    assert chunks and all(chunk.choices for chunk in chunks)
    (row,) = wait_rows(kr, 1)
    assert row["attempts"] == 2 and row["total_tokens"] and row["prompt_tokens"] and row["completion_tokens"]
