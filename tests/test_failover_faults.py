"""Failover under attack and under provider faults, end to end (issue: failover you can trust).

The official openai client → a real mitmproxy running keyrotor → the fake upstream, whose
faults follow a request (tests/fake_faults.py), a model, a key's rate or the whole provider.
Every client uses max_retries=0: what the proxy lets through reaches the test.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.conftest import Keyrotor, raw_chat_request, wait_for
from tests.fake_upstream import FLAKY_PREFIX, FakeUpstream

KEYS = [f"sk-good-fault-{c * 24}{n:04d}" for n, c in enumerate("abcd", start=1)]
MODEL = "gpt-4o-mini"


def client_for(kr: Keyrotor, key: str, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=timeout)


def ask(client: openai.OpenAI, text: str = "hello", stream: bool = False, model: str = MODEL) -> str:
    messages = [{"role": "user", "content": text}]
    if not stream:
        return client.chat.completions.create(model=model, messages=messages).choices[0].message.content
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    return "".join(c.choices[0].delta.content or "" for c in chunks)


def outcome(call) -> str:
    """'ok', or the exception's class name and status: what a client sees."""
    try:
        call()
        return "ok"
    except openai.APIStatusError as e:
        return f"{type(e).__name__} {e.status_code}"
    except openai.APIError as e:
        return f"{type(e).__name__} {getattr(e, 'code', None) or ''}".strip()


def rows(kr: Keyrotor, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    return kr.query(sql, params)


def recorded(kr: Keyrotor, count: int, sql: str) -> list[sqlite3.Row]:
    """The rows of `sql` once there are `count` of them (the writer commits within a quarter second)."""
    return wait_for(lambda: (found := rows(kr, sql)) and len(found) >= count and found, what=f"{count} rows")


def untouched(kr: Keyrotor) -> bool:
    """No key was marked: all active, no reason recorded."""
    return all(r["state"] == "active" and not r["state_reason"] for r in rows(kr, "SELECT * FROM upstream_keys"))


def chats(upstream: FakeUpstream, marker: str | None = None) -> list:
    return [
        r
        for r in upstream.received
        if r.path == "/v1/chat/completions" and (marker is None or marker.encode() in r.body)
    ]


def run_all(calls, workers: int = 16) -> list[str]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(outcome, calls))


def started(kr: Keyrotor, upstream: FakeUpstream, keys: list[str], *settings: str) -> openai.OpenAI:
    client_key = kr.start_serving(*keys, proxy_args=tuple(item for setting in settings for item in ("--set", setting)))
    return client_for(kr, client_key)


# ---------------------------------------------------------------------- §1: one request, one client


def test_a_request_too_large_goes_back_as_it_is_and_rests_no_key(keyrotor: Keyrotor, upstream: FakeUpstream):
    client = started(keyrotor, upstream, KEYS[:3])
    attacks = run_all([lambda: ask(client, "#fault:too_large")] * 2)
    assert attacks == ["RateLimitError 429"] * 2  # upstream's own answer, its Retry-After included
    assert len(chats(upstream, "#fault:too_large")) == 2  # never retried: no key can serve it
    others = run_all([lambda: ask(client)] * 60)
    assert others == ["ok"] * 60
    assert untouched(keyrotor)


def test_requests_that_fail_everywhere_do_not_take_the_pool_down(keyrotor: Keyrotor, upstream: FakeUpstream):
    client = started(keyrotor, upstream, KEYS[:3])
    # Each key serves once first (round robin): only a key upstream has accepted since the start
    # lets a 500 follow the request; a new key's 500 counts against the key (see the cold start below).
    assert all(ask(client) for _ in KEYS[:3])
    calls = (
        [lambda: ask(client, "#fault:server_error")] * 30
        + [lambda: ask(client, "#fault:stream_cut", stream=True)] * 10
        + [lambda: ask(client)] * 60
    )
    seen = run_all(calls)
    assert seen[:30] == ["InternalServerError 500"] * 30  # upstream's 500, as it is
    assert seen[30:40] == ["APIError upstream_stream_interrupted"] * 10  # an error event, not a truncated stream
    assert seen[40:] == ["ok"] * 60
    # A 500 that repeats on a second key follows the request: two attempts, then the client.
    assert len(chats(upstream, "#fault:server_error")) == 60
    assert untouched(keyrotor)
    assert run_all([lambda: ask(client)] * 30) == ["ok"] * 30


def test_a_one_key_pool_survives_a_request_answered_500_three_times(keyrotor: Keyrotor, upstream: FakeUpstream):
    client = started(keyrotor, upstream, KEYS[:1])
    assert outcome(lambda: ask(client, "#fault:server_error")) == "InternalServerError 500"
    assert len(chats(upstream, "#fault:server_error")) == 3  # the only key, up to max_attempts
    assert run_all([lambda: ask(client)] * 10) == ["ok"] * 10  # nobody else gets a 503 for it
    assert untouched(keyrotor)


# ---------------------------------------------------------------------- §2: wait, never the same bad key


def test_waiting_for_rate_limited_keys_lets_a_burst_succeed(keyrotor: Keyrotor, upstream: FakeUpstream):
    for key in KEYS[:3]:
        upstream.faults.key_rpm[key] = (4, 2.0)  # 12 requests per 2 s for the pool
    client = started(keyrotor, upstream, KEYS[:3], "keypool.wait_max_seconds=15")
    assert run_all([lambda: ask(client)] * 36, workers=36) == ["ok"] * 36


def test_a_retry_never_returns_to_a_failing_key_while_new_keys_are_busy(keyrotor: Keyrotor, upstream: FakeUpstream):
    flaky = FLAKY_PREFIX + "-fault-" + "x" * 24  # always answered with a 500
    upstream.stream_delay = 0.02
    client = started(keyrotor, upstream, [flaky, *KEYS])
    assert run_all([lambda: ask(client, stream=True)] * 40, workers=40) == ["ok"] * 40
    recorded(keyrotor, 40, "SELECT id FROM flows")
    attempts = rows(keyrotor, "SELECT flow_id, upstream_key_id FROM attempts")
    per_flow: dict[str, list[int]] = {}
    for row in attempts:
        per_flow.setdefault(row["flow_id"], []).append(row["upstream_key_id"])
    assert all(len(keys) == len(set(keys)) for keys in per_flow.values()), per_flow


def test_a_cold_start_burst_over_bad_keys_reaches_the_good_ones(keyrotor: Keyrotor, upstream: FakeUpstream):
    # Right after a start no key is proven: two that answer 500 to everything and two revoked ones
    # fail requests that four good keys can serve. Their 500s count against them, not the request.
    flaky = [FLAKY_PREFIX + f"-fault-{c * 24}" for c in "xy"]
    revoked = [f"sk-revoked-fault-{c * 24}" for c in "xy"]
    upstream.stream_delay = 0.02
    client = started(keyrotor, upstream, [*flaky, *revoked, *KEYS])
    seen = run_all([lambda: ask(client, stream=True)] * 40, workers=40)
    assert seen == ["ok"] * 40, f"{sum(s != 'ok' for s in seen)} of 40 failed: {sorted(set(seen))}"


# ---------------------------------------------------------------------- §2, §3, §7: timeouts and streams


def test_a_hanging_key_is_timed_out_and_retried_before_the_client_sees_anything(
    keyrotor: Keyrotor, upstream: FakeUpstream
):
    upstream.set_key(KEYS[0], "hang")
    client = started(keyrotor, upstream, KEYS[:2], "keypool.attempt_timeout_seconds=2")
    assert ask(client)  # key 1 never answers: after 2 s, key 2 does
    upstream.set_key(KEYS[0], "hang_after_headers")  # round robin comes back to key 1
    assert ask(client, stream=True)  # its stream never starts: retried, not a stream that hangs
    retried = recorded(keyrotor, 2, "SELECT first_byte_at, started_at, attempts FROM flows ORDER BY id")
    assert [r["attempts"] for r in retried] == [2, 2]
    # The client's first byte came from the retry, after the first attempt's 2 s.
    assert all(r["first_byte_at"] - r["started_at"] >= 2 for r in retried)


def test_a_stream_that_stalls_or_breaks_ends_with_an_error_event(keyrotor: Keyrotor, upstream: FakeUpstream):
    client = started(keyrotor, upstream, KEYS[:2], "keypool.stream_idle_seconds=1")
    for fault in ("stream_stall", "stream_cut"):
        with pytest.raises(openai.APIError) as caught:
            ask(client, f"#fault:{fault}", stream=True)
        assert caught.value.code == "upstream_stream_interrupted"
    found = recorded(keyrotor, 2, "SELECT status, error FROM flows ORDER BY id")
    assert [r["status"] for r in found] == [200, 200]  # what the client got: a 200 stream…
    assert "timed out" in found[0]["error"] and "broke off" in found[1]["error"]  # …that failed
    assert untouched(keyrotor)  # a stream broken once it reached the client is no key's proven fault


def test_no_attempt_starts_after_the_client_has_gone(keyrotor: Keyrotor, upstream: FakeUpstream):
    upstream.set_key(KEYS[0], "ratelimit", times=1, retry_after="3")
    client_key = keyrotor.add_client()
    keyrotor.add_keys(KEYS[0])
    keyrotor.start_proxy("--set", "keypool.wait_max_seconds=10")
    with socket.create_connection(("127.0.0.1", keyrotor.proxy_port)) as conn:
        conn.sendall(raw_chat_request(client_key, MODEL))
        wait_for(lambda: chats(upstream), what="the first attempt")  # answered 429: the proxy now waits 3 s
    # The client has hung up while the proxy waits out the key's Retry-After.
    time.sleep(4)  # past it: a retry for nobody would have gone out by now
    assert len(chats(upstream)) == 1


# ---------------------------------------------------------------------- §7: one model's faults, recovery


def test_one_models_rate_limits_leave_other_models_alone_and_recovery_is_prompt(
    keyrotor: Keyrotor, upstream: FakeUpstream
):
    client = started(keyrotor, upstream, KEYS[:2])
    upstream.faults.model_faults["gpt-4o"] = "ratelimit_nohint"
    limited = run_all([lambda: ask(client, model="gpt-4o")] * 6)
    assert all(seen in ("RateLimitError 429", "InternalServerError 503") for seen in limited), limited
    before = len(chats(upstream))
    assert run_all([lambda: ask(client)] * 12) == ["ok"] * 12
    assert len(chats(upstream)) == before + 12  # every one reached upstream, none refused locally
    del upstream.faults.model_faults["gpt-4o"]
    cleared = time.monotonic()
    wait_for(lambda: outcome(lambda: ask(client, model="gpt-4o")) == "ok", timeout=15, what="gpt-4o back")
    # A rest from a second, doubled by each round of 429s on every key (how many rounds the six
    # requests made depends on the machine's speed): seconds, never the 60 s of a fixed cooldown.
    assert time.monotonic() - cleared < 15
    states = [dict(r) for r in rows(keyrotor, "SELECT state, state_reason FROM upstream_keys")]
    assert all(r["state"] == "active" for r in states), states


def test_a_provider_that_was_down_is_used_again_as_soon_as_it_answers(keyrotor: Keyrotor, upstream: FakeUpstream):
    others = [keyrotor.add_client(f"app{n}") for n in range(3)]  # known to the proxy from its start
    clients = [started(keyrotor, upstream, KEYS[:3])] + [client_for(keyrotor, key) for key in others]
    upstream.faults.down = True
    down = run_all([lambda c=c: ask(c) for c in clients * 5])
    assert all(seen in ("InternalServerError 503",) for seen in down), down
    upstream.faults.down = False
    wait_for(lambda: all(outcome(lambda c=c: ask(c)) == "ok" for c in clients), timeout=5, what="traffic back")
    assert all(r["state"] == "active" for r in rows(keyrotor, "SELECT state FROM upstream_keys"))


# ---------------------------------------------------------------------- §3: rows tell the truth


def test_rows_record_what_the_client_got(keyrotor: Keyrotor, upstream: FakeUpstream):
    for key in KEYS[:2]:
        upstream.set_key(key, "disconnect")  # a body cut short, on every key
    client = started(keyrotor, upstream, KEYS[:2])
    assert outcome(lambda: ask(client)) == "InternalServerError 502"
    (row,) = recorded(keyrotor, 1, "SELECT status, error FROM flows")
    assert row["status"] == 502 and row["error"]


def test_keyrotors_own_refusals_are_recorded_with_their_reason(keyrotor: Keyrotor, upstream: FakeUpstream):
    revoked = "sk-revoked-fault-" + "x" * 24
    client = started(keyrotor, upstream, [revoked])
    assert outcome(lambda: ask(client)) == "InternalServerError 503"
    (row,) = recorded(keyrotor, 1, "SELECT status, error FROM flows")
    assert row["status"] == 503 and row["error"].startswith("no_upstream_key_available: ")
    assert revoked not in json.dumps(dict(row))
