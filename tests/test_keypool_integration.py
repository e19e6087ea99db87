"""The key pool's promise, end to end: while one key can serve, no client request fails because of another key.

The official openai client → a real mitmproxy running keyrotor (run.py proxy) → the fake upstream,
whose keys behave like OpenAI's revoked, rate-limited and out-of-quota keys.
"""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import Keyrotor, raises, wait_for
from tests.fake_upstream import FakeUpstream

GOOD = ["sk-good-pool-aaaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-pool-bbbbbbbbbbbbbbbbbbbbbbb0002"]
RATE_LIMITED = "sk-good-pool-ratelimitedxxxxxxxxxxxx0003"
QUOTA = "sk-good-pool-outofquotaxxxxxxxxxxxxxx0004"
INVALID = "sk-revoked-pool-xxxxxxxxxxxxxxxxxxxxx0005"
MESSAGES = [{"role": "user", "content": "Say hello to the pool"}]


def client_for(kr: Keyrotor, key: str) -> openai.OpenAI:
    # max_retries=0: any failure the proxy lets through reaches the test.
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=30)


def query(kr: Keyrotor, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    return kr.query(sql, params)


def key_states(kr: Keyrotor) -> dict[str, str]:
    return {r["last4"]: r["state"] for r in query(kr, "SELECT last4, state FROM upstream_keys")}


def chat(client: openai.OpenAI, streamed: bool) -> str:
    if not streamed:
        return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices[0].message.content
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert chunks and all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    return "".join(c.choices[0].delta.content or "" for c in chunks)


def test_bad_keys_never_reach_the_client(keyrotor: Keyrotor, upstream: FakeUpstream):
    keyrotor.add_keys(INVALID, RATE_LIMITED, QUOTA, *GOOD)
    upstream.set_key(RATE_LIMITED, "ratelimit", times=2, retry_after="1")
    upstream.set_key(QUOTA, "quota")
    client_key = keyrotor.add_client()
    keyrotor.start_proxy()
    client = client_for(keyrotor, client_key)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: chat(client, streamed=i % 2 == 1), range(200)))

    assert len(replies) == 200 and all(replies)  # any client-visible error would have raised
    assert upstream.keys_seen().count(INVALID) <= 1
    assert upstream.keys_seen().count(QUOTA) <= 1

    def settled() -> dict[str, str] | None:
        chat(client, streamed=False)  # the rate-limited key comes back through a probe request
        states = key_states(keyrotor)
        return states if states["0003"] == "active" else None

    states = wait_for(settled, timeout=15, interval=0.2, what="the rate-limited key's probe to succeed")
    assert states == {"0005": "invalid", "0003": "active", "0004": "exhausted", "0001": "active", "0002": "active"}
    assert [r.key for r in upstream.received if r.key == RATE_LIMITED][:3]  # it was used again after its 429s

    retried = query(keyrotor, "SELECT flow_id, attempts, status FROM flows WHERE attempts > 1")
    assert retried and all(r["status"] == 200 for r in retried)
    attempts = query(
        keyrotor,
        "SELECT a.flow_id, a.attempt, a.status, k.last4 FROM attempts a"
        " JOIN upstream_keys k ON k.id = a.upstream_key_id ORDER BY a.flow_id, a.attempt",
    )
    failed = {(r["last4"], r["status"]) for r in attempts if r["status"] != 200}
    assert ("0005", 401) in failed and ("0004", 429) in failed and ("0003", 429) in failed
    assert len({r["flow_id"] for r in attempts}) == len(retried)


@pytest.mark.parametrize(
    "wait_max, pool_window, succeeds", [(3, 10, True), (0, 10, False), (3, 0, True), (0, 0, False)]
)
def test_rate_limits_on_every_key_are_waited_out_or_answered_with_503(
    keyrotor: Keyrotor, upstream: FakeUpstream, wait_max: int, pool_window: int, succeeds: bool
):
    keyrotor.add_keys(*GOOD)
    for key in GOOD:
        upstream.set_key(key, "ratelimit", times=1, retry_after="1")
    client_key = keyrotor.add_client()
    keyrotor.start_proxy(
        "--set", f"keypool.wait_max_seconds={wait_max}", "--set", f"keypool.pool_429_window_seconds={pool_window}"
    )

    response = httpx.post(
        f"{keyrotor.base_url}/chat/completions",
        headers={"authorization": f"Bearer {client_key}"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        timeout=30,
    )

    limited = [r for r in upstream.received if r.path == "/v1/chat/completions"]
    if succeeds:
        assert response.status_code == 200, response.text
        assert len(limited) == 3
        # Sent again after the Retry-After: of the pool (from the second 429), else of the key it went to.
        limited_at = limited[1].at if pool_window else next(r.at for r in limited[:2] if r.key == limited[2].key)
        assert limited[2].at - limited_at >= 0.9
    else:
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_upstream_key_available"
        assert response.headers["retry-after"] == "1"
        assert len(limited) == 2
    # Either one limit for the whole pool (neither key was marked) or each key rested for this
    # model only: both stay active for every other model.
    expected = ["active", "active"]
    wait_for(lambda: sorted(key_states(keyrotor).values()) == expected, what=f"key states {expected}")
    if not pool_window and not succeeds:
        rested = ["429 rate_limit_exceeded (gpt-4o-mini)"] * 2
        # The writer stores each change within a quarter second: the second may still be on its way.
        wait_for(
            lambda: [r["state_reason"] for r in query(keyrotor, "SELECT state_reason FROM upstream_keys")] == rested,
            what="both keys' reasons",
        )


def test_a_dropped_connection_is_retried_on_another_key(keyrotor: Keyrotor, upstream: FakeUpstream):
    keyrotor.add_keys(*GOOD)
    upstream.set_key(GOOD[0], "disconnect", times=1)
    client_key = keyrotor.add_client()
    keyrotor.start_proxy()
    client = client_for(keyrotor, client_key)

    assert chat(client, streamed=True)
    assert upstream.keys_seen()[:2] == GOOD
    rows = wait_for(lambda: query(keyrotor, "SELECT attempts, status, error FROM flows"), what="the row")
    assert (rows[0]["attempts"], rows[0]["status"], rows[0]["error"]) == (2, 200, None)


def test_admin_changes_reach_the_running_proxy_within_a_second(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = keyrotor.start_serving(*GOOD, proxy_args=("--set", "keypool.strategy=weighted"))
    client = client_for(keyrotor, client_key)
    client.models.list()
    client.models.list()  # both keys proven

    def shares_after(count: int) -> list[str]:
        start = len(upstream.received)
        for _ in range(count):
            client.models.list()
        return [r.key for r in upstream.received[start:]]

    keyrotor.cli("keys", "weight", "3", "1")
    wait_for(lambda: shares_after(8).count(GOOD[0]) == 6, timeout=1.5, interval=0.05, what="the new weight")
    keyrotor.cli("keys", "disable", "1")
    wait_for(lambda: set(shares_after(4)) == {GOOD[1]}, timeout=1.5, interval=0.05, what="the disabled key to rest")
    keyrotor.cli("keys", "delete", "2")
    wait_for(
        lambda: isinstance(raises(client.models.list), openai.InternalServerError),
        timeout=1.5,
        interval=0.05,
        what="the deleted key to be gone",
    )


def test_keys_validate_brings_back_a_key_that_works_again(keyrotor: Keyrotor, upstream: FakeUpstream):
    keyrotor.add_keys(GOOD[0], INVALID)
    keyrotor.cli("keys", "disable", "1")  # so the invalid key is the one tried
    client_key = keyrotor.add_client()
    keyrotor.start_proxy()
    client = client_for(keyrotor, client_key)
    assert isinstance(raises(client.models.list), openai.InternalServerError)  # 503: no key could serve
    wait_for(lambda: key_states(keyrotor)["0005"] == "invalid", what="the key to be marked invalid")

    result = keyrotor.cli("keys", "validate", "--upstream", keyrotor.upstream_url)
    assert "#2 …0005: invalid (401 invalid_api_key) → invalid" in result.stdout
    upstream.set_key(INVALID, "ok")  # fixed upstream (billing sorted, key re-enabled)
    result = keyrotor.cli("keys", "validate", "--upstream", keyrotor.upstream_url)
    assert "#2 …0005: ok → active" in result.stdout
    wait_for(lambda: raises(client.models.list) is None, timeout=1.5, interval=0.05, what="the revived key to serve")
    assert INVALID not in result.stdout + result.stderr


def test_scheduled_revalidation_returns_keys_by_itself(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = keyrotor.start_serving(GOOD[0], INVALID, proxy_args=("--set", "keypool.revalidate_seconds=1"))
    client = client_for(keyrotor, client_key)
    client.models.list()
    client.models.list()  # one of them met the invalid key and was retried
    wait_for(lambda: key_states(keyrotor)["0005"] == "invalid", what="the key to be marked invalid")
    upstream.set_key(INVALID, "ok")
    wait_for(lambda: key_states(keyrotor)["0005"] == "active", timeout=5, what="the scheduled probe to revive it")
    probes = [r for r in upstream.received if r.key == INVALID and r.path == "/v1/models"]
    assert probes


@pytest.mark.parametrize("keys, code", [((), "no_upstream_key_configured"), ((INVALID,), "no_upstream_key_available")])
def test_a_pool_that_waiting_cannot_help_tells_the_sdk_not_to_retry(
    keyrotor: Keyrotor, upstream: FakeUpstream, keys: tuple[str, ...], code: str
):
    if keys:
        keyrotor.add_keys(*keys)
    client_key = keyrotor.add_client()
    keyrotor.start_proxy()
    if keys:  # the key is found invalid by a first request
        httpx.post(f"{keyrotor.base_url}/models", headers={"authorization": f"Bearer {client_key}"}, timeout=30)
    # The SDK's default retries: with Retry-After: 60 it used to wait two minutes before raising.
    client = openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, timeout=30)
    error = raises(lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
    assert isinstance(error, openai.InternalServerError) and error.code == code
    assert error.response.headers["x-should-retry"] == "false" and "retry-after" not in error.response.headers
    assert len([r for r in upstream.received if r.path == "/v1/chat/completions"]) == 0

    def chat_rows() -> int:
        conn = sqlite3.connect(keyrotor.db_path)
        try:
            return conn.execute("SELECT count(*) FROM flows WHERE path = '/v1/chat/completions'").fetchone()[0]
        finally:
            conn.close()

    wait_for(lambda: chat_rows() >= 1, what="the refused request's row")
    assert chat_rows() == 1  # the SDK asked once: it did not retry
