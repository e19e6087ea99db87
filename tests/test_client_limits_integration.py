"""Client governance end to end: the official openai client → a real mitmproxy running keyrotor → the fake upstream.

Each refusal with its status, code, headers and the SDK's exception type; exact limits under
concurrency; budgets spent by streams; counts that survive a restart; CLI changes that a
running proxy applies within a second.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx
import openai
import pytest

from tests.conftest import Keyrotor, wait_for
from tests.fake_upstream import FakeUpstream

GOOD = ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-bbbbbbbbbbbbbbbbbbbbbbbbbbbb0002"]
MESSAGES = [{"role": "user", "content": "Say hello to the proxy"}]
# The proxy polls for admin changes every 0.5 s: a change applies within a second. The deadline
# leaves room for a loaded two-core machine; what a user would notice is "at once", not minutes.
APPLY_DEADLINE = 2.0


def client_for(kr: Keyrotor, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=20)


def chat(kr: Keyrotor, key: str, model: str = "gpt-4o-mini", **extra):
    return client_for(kr, key).chat.completions.create(model=model, messages=MESSAGES, **extra)


def stream(kr: Keyrotor, key: str, model: str = "gpt-4o-mini") -> str:
    return "".join(
        c.choices[0].delta.content or ""
        for c in client_for(kr, key).chat.completions.create(model=model, messages=MESSAGES, stream=True)
        if c.choices
    )


def flow_rows(kr: Keyrotor) -> list[sqlite3.Row]:
    return kr.query("SELECT * FROM flows ORDER BY id")


def wait_rows(kr: Keyrotor, count: int) -> list[sqlite3.Row]:
    return wait_for(lambda: len(r := flow_rows(kr)) >= count and r, what=f"{count} captured rows")


def new_client(kr: Keyrotor, name: str, *limits: str) -> str:
    return kr.setup("clients", "add", name, *limits).stdout.strip().splitlines()[-1]


@pytest.fixture
def kr(keyrotor: Keyrotor) -> Keyrotor:
    keyrotor.add_keys(*GOOD)
    return keyrotor


def test_model_outside_the_allowlist_is_refused_naming_it(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "team-a", "--models", "gpt-4o*,text-embedding-3-small")
    kr.start_proxy()
    assert chat(kr, key, "gpt-4o-mini").choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError) as raised:
        chat(kr, key, "gpt-3.5-turbo")
    assert raised.value.status_code == 403
    assert raised.value.code == "model_not_allowed"
    assert "gpt-3.5-turbo" in raised.value.message
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert [r.path for r in upstream.received] == ["/v1/chat/completions"]  # the refused one never went
    rows = wait_rows(kr, 2)
    assert [r["refusal"] for r in rows] == [None, "model_not_allowed"]
    assert rows[1]["error"].startswith("model_not_allowed: ")
    assert rows[1]["client_id"] == rows[0]["client_id"] is not None


def test_rate_limit_refusal_has_openai_headers_and_success_carries_the_clients_own(kr: Keyrotor, upstream):
    key = new_client(kr, "team-b", "--rpm", "2", "--tpm", "100000")
    kr.start_proxy()
    first = client_for(kr, key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    headers = first.headers
    # Upstream said 10000 (its limit for our pooled key); the client sees its own.
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(headers["x-ratelimit-remaining-tokens"]) < 100000
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    chat(kr, key)
    with pytest.raises(openai.RateLimitError) as raised:
        chat(kr, key)
    error = raised.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    for name in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{name}-requests" in error.response.headers
        assert f"x-ratelimit-{name}-tokens" in error.response.headers
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(upstream.received) == 2
    assert wait_rows(kr, 3)[2]["refusal"] == "rate_limit_exceeded"


def test_an_rpm_of_n_lets_exactly_n_of_many_concurrent_requests_through(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "burst", "--rpm", "15")
    kr.start_proxy()

    async def burst() -> list[int]:
        client = openai.AsyncOpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=30)

        async def one() -> int:
            try:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                return 200
            except openai.APIStatusError as e:
                return e.status_code

        try:
            return await asyncio.gather(*(one() for _ in range(60)))
        finally:
            await client.close()

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 15
    assert statuses.count(429) == 45
    assert len(upstream.received) == 15


def test_a_budget_spent_by_streamed_requests_stops_the_next_request(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "streamer", "--daily-tokens", "40")
    kr.start_proxy()
    assert stream(kr, key)  # about 25 tokens: under budget
    assert stream(kr, key)  # admitted under budget (25 < 40), allowed to finish: now over it
    with pytest.raises(openai.RateLimitError) as raised:
        stream(kr, key)
    error = raised.value
    assert error.status_code == 429
    assert error.code == "insufficient_quota"
    assert "daily token budget" in error.message and "renews at" in error.message
    assert error.response.headers["x-should-retry"] == "false"  # the SDKs would otherwise retry a 429
    assert len(upstream.received) == 2
    rows = wait_rows(kr, 3)
    assert rows[0]["total_tokens"] + rows[1]["total_tokens"] >= 40 > rows[0]["total_tokens"]
    assert rows[2]["refusal"] == "insufficient_quota"


def test_a_cost_budget_counts_from_prices(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "spender", "--monthly-usd", "0.000001")
    kr.start_proxy()
    chat(kr, key, "gpt-4o-mini")  # about 25 tokens at $0.15 and $0.60 a million: over a millionth of a dollar
    with pytest.raises(openai.RateLimitError) as raised:
        chat(kr, key, "gpt-4o-mini")
    assert raised.value.code == "insufficient_quota"
    assert "monthly cost budget of $1e-06" in raised.value.message


def test_expired_key_and_address_not_allowed(kr: Keyrotor, upstream: FakeUpstream):
    expired = new_client(kr, "old", "--expires", "2020-01-01")
    elsewhere = new_client(kr, "far", "--ips", "10.0.0.0/8,2001:db8::/32")
    here = new_client(kr, "near", "--ips", "10.0.0.0/8,127.0.0.1")
    kr.start_proxy()
    with pytest.raises(openai.AuthenticationError) as raised:
        chat(kr, expired)
    assert raised.value.status_code == 401 and raised.value.code == "key_expired"
    assert "2020-01-01T00:00:00Z" in raised.value.message
    with pytest.raises(openai.PermissionDeniedError) as raised:
        chat(kr, elsewhere)
    assert raised.value.status_code == 403 and raised.value.code == "ip_not_allowed"
    assert "127.0.0.1" in raised.value.message
    assert chat(kr, here).choices
    assert len(upstream.received) == 1
    assert [r["refusal"] for r in wait_rows(kr, 3)] == ["key_expired", "ip_not_allowed", None]


def test_requests_in_flight_at_once(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "serial", "--max-parallel", "1")
    upstream.stream_chunks, upstream.stream_delay = 4, 0.3
    kr.start_proxy()
    running = client_for(kr, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    next(iter(running))  # the first request is in flight
    with pytest.raises(openai.RateLimitError) as raised:
        chat(kr, key)
    assert raised.value.code == "rate_limit_exceeded"
    assert raised.value.response.headers["retry-after"] == "1"
    list(running)
    upstream.stream_delay = 0
    assert chat(kr, key).choices  # its slot is free again


def test_per_address_rpm_across_clients(kr: Keyrotor, upstream: FakeUpstream):
    keys = [new_client(kr, name) for name in ("one", "two", "three")]
    kr.start_proxy("--set", "access.ip_rpm=2")
    chat(kr, keys[0])
    chat(kr, keys[1])
    with pytest.raises(openai.RateLimitError) as raised:
        chat(kr, keys[2])
    assert raised.value.code == "rate_limit_exceeded"
    assert "this address" in raised.value.message


def test_limits_and_spend_survive_a_restart(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "steady", "--rpm", "3", "--daily-tokens", "1000000")
    kr.start_proxy()
    chat(kr, key)
    stream(kr, key)
    kr.stop()
    kr.start_proxy()
    listing = kr.cli("clients", "list").stdout
    spent = sum(r["total_tokens"] for r in wait_rows(kr, 2))
    assert f"{spent}/$" in listing  # today's tokens, as the proxy saved them
    chat(kr, key)  # the third of three this minute
    with pytest.raises(openai.RateLimitError):
        chat(kr, key)  # the restarted proxy remembers the first two


def test_cli_changes_apply_to_a_running_proxy_within_a_second(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "live")
    kr.start_proxy()
    assert chat(kr, key, "gpt-3.5-turbo").choices

    def refused_model() -> bool:
        try:
            chat(kr, key, "gpt-3.5-turbo")
        except openai.PermissionDeniedError:
            return True
        return False

    kr.cli("clients", "set", "live", "--models", "gpt-4o-mini")
    wait_for(refused_model, timeout=APPLY_DEADLINE, interval=0.05, what="the allowlist to apply")
    kr.cli("clients", "set", "live", "--models", "none")
    wait_for(lambda: not refused_model(), timeout=APPLY_DEADLINE, interval=0.05, what="the allowlist to clear")

    second = kr.cli("clients", "keys", "live", "add").stdout.strip().splitlines()[-1]
    wait_for(lambda: _works(kr, second), timeout=APPLY_DEADLINE, interval=0.05, what="the new key to work")
    listing = kr.cli("clients", "keys", "live", "list").stdout
    first_id = int(listing.splitlines()[1].split()[0])
    kr.cli("clients", "keys", "live", "revoke", str(first_id))
    wait_for(lambda: not _works(kr, key), timeout=APPLY_DEADLINE, interval=0.05, what="the revoked key to fail")
    assert _works(kr, second)
    assert "revoked" in kr.cli("clients", "keys", "live", "list").stdout
    # The client's history stays: its requests count over both keys.
    wait_for(lambda: " live " in (out := kr.cli("clients", "list").stdout) and out)


def _works(kr: Keyrotor, key: str) -> bool:
    return httpx.get(f"{kr.base_url}/models", headers={"authorization": f"Bearer {key}"}).status_code == 200


def test_cli_rejects_bad_limits_with_a_sentence(kr: Keyrotor):
    result = kr.cli("clients", "add", "x", "--rpm", "many", check=False)
    assert result.returncode == 1 and "rpm must be a whole number" in result.stderr
    result = kr.cli("clients", "add", "x", "--ips", "300.1.1.1", check=False)
    assert result.returncode == 1 and "not an IP address" in result.stderr
    result = kr.cli("clients", "set", "nobody", "--rpm", "5", check=False)
    assert result.returncode == 1 and "no client named 'nobody'" in result.stderr
    assert "x" not in [line.split()[1] for line in kr.cli("clients", "list").stdout.splitlines()[1:]]


def test_a_client_limited_to_groups_is_refused_models_only_other_groups_serve(kr: Keyrotor, upstream: FakeUpstream):
    kr.setup("models", "add", "default/default", "gpt-4o-mini")
    kr.setup("upstreams", "add", "second", upstream.url)
    kr.setup("groups", "add", "second/main")
    kr.setup("keys", "add", "--group", "second/main", input=GOOD[1] + "\n")
    kr.setup("models", "add", "second/main", "gpt-4o")
    key = new_client(kr, "narrow", "--groups", "default/default")
    kr.start_proxy()
    assert chat(kr, key, "gpt-4o-mini").choices
    with pytest.raises(openai.PermissionDeniedError) as raised:
        chat(kr, key, "gpt-4o")
    assert raised.value.code == "model_not_allowed"
    assert "default/default" in raised.value.message and "'gpt-4o'" in raised.value.message
    assert len(upstream.received) == 1


def test_refusals_by_reason_on_the_dashboard_and_metrics_and_the_flows_filter(kr: Keyrotor, upstream: FakeUpstream):
    from tests.conftest import ADMIN_KEY

    key = new_client(kr, "capped", "--models", "gpt-4o-mini", "--rpm", "3")
    kr.start_proxy()
    kr.start_ui()
    chat(kr, key)
    for _ in range(2):
        with pytest.raises(openai.PermissionDeniedError):
            chat(kr, key, "gpt-4o")
    chat(kr, key)  # refused models took nothing from the RPM: this is the second of three
    chat(kr, key)
    with pytest.raises(openai.RateLimitError):
        chat(kr, key)
    wait_rows(kr, 6)
    api = httpx.Client(base_url=kr.ui_url, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    refusals = wait_for(lambda: (r := api.get("/api/dashboard").json()["refusals"]) and len(r) == 2 and r)
    assert refusals == {"model_not_allowed": 2, "rate_limit_exceeded": 1}
    metrics = api.get("/metrics").text
    assert 'keyrotor_refusals_total{reason="model_not_allowed"} 2' in metrics
    assert 'keyrotor_refusals_total{reason="rate_limit_exceeded"} 1' in metrics
    flows = api.get("/api/flows", params={"refusal": "any"}).json()["flows"]
    assert sorted(f["refusal"] for f in flows) == ["model_not_allowed", "model_not_allowed", "rate_limit_exceeded"]
    assert len(api.get("/api/flows", params={"refusal": "model_not_allowed"}).json()["flows"]) == 2
    page = api.get("/dashboard").text
    assert 'href="/flows?refusal=model_not_allowed"' in page


def test_a_limited_client_is_refused_an_ephemeral_key_that_would_bypass_its_limits(kr: Keyrotor, upstream):
    """An ephemeral Realtime key talks to upstream directly: for a client with limits it would be a way
    around its model allowlist and budget, so keyrotor answers 403 and asks upstream for nothing."""
    limited = new_client(kr, "team-a", "--models", "gpt-realtime-mini", "--daily-tokens", "1000")
    open_client = new_client(kr, "team-b")
    kr.start_proxy()
    body = {"session": {"type": "realtime", "model": "gpt-realtime"}}
    refused = httpx.post(
        f"{kr.base_url}/realtime/client_secrets", json=body, headers={"authorization": f"Bearer {limited}"}
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "ephemeral_key_not_allowed"
    assert refused.headers["x-should-retry"] == "false"
    assert not [r for r in upstream.received if "client_secrets" in r.path]  # never asked upstream
    passed = httpx.post(
        f"{kr.base_url}/realtime/client_secrets", json=body, headers={"authorization": f"Bearer {open_client}"}
    )
    assert passed.headers.get("x-keyrotor-error") != "ephemeral_key_not_allowed"
    assert [r.path for r in upstream.received if "client_secrets" in r.path] == ["/v1/realtime/client_secrets"]


def batch_file(*models: str) -> bytes:
    """A batch's input file: one chat request a line, each naming its model."""
    return b"".join(
        json.dumps(
            {
                "custom_id": f"request-{n}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": MESSAGES},
            }
        ).encode()
        + b"\n"
        for n, model in enumerate(models, 1)
    )


def test_a_batch_input_file_naming_a_model_outside_the_allowlist_is_refused_at_upload(kr: Keyrotor, upstream):
    """Upstream runs the model each line of a batch's input file names: a client allowed only gpt-4o-mini
    cannot upload one whose line names gpt-4o (the batch would run it), nor one whose model cannot be read."""
    limited = new_client(kr, "team-a", "--models", "gpt-4o-mini")
    open_client = new_client(kr, "team-b")
    kr.start_proxy()
    client = client_for(kr, limited)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.files.create(
            file=("in.jsonl", batch_file("gpt-4o-mini", "gpt-4o", "gpt-4o-mini"), "application/jsonl"),
            purpose="batch",
        )
    assert raised.value.status_code == 403
    assert raised.value.code == "model_not_allowed"
    assert "'gpt-4o'" in raised.value.message and "line 2" in raised.value.message
    assert raised.value.response.headers["x-should-retry"] == "false"
    unreadable = batch_file("gpt-4o-mini") + b"not json\n"
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.create(file=("in.jsonl", unreadable, "application/jsonl"), purpose="batch")
    assert bad.value.code == "invalid_model" and "Line 2" in bad.value.message
    with pytest.raises(openai.PermissionDeniedError) as in_parts:  # the Uploads API: parts cannot be read whole
        client.uploads.create(bytes=100, filename="in.jsonl", mime_type="text/jsonl", purpose="batch")
    assert in_parts.value.code == "model_not_allowed" and "/v1/files" in in_parts.value.message
    assert not [r for r in upstream.received if "/files" in r.path or "/uploads" in r.path]  # nothing sent

    uploaded = client.files.create(
        file=("in.jsonl", batch_file("gpt-4o-mini", "gpt-4o-mini"), "application/jsonl"), purpose="batch"
    )
    assert uploaded.id.startswith("file-") and uploaded.purpose == "batch"
    notes = client.files.create(file=("notes.txt", b"gpt-4o, not json"), purpose="assistants")  # not a batch's
    assert notes.id.startswith("file-")
    # A client without an allowlist uploads what it likes: upstream validates the file.
    anything = client_for(kr, open_client).files.create(
        file=("in.jsonl", batch_file("gpt-4o") + b"not json\n", "application/jsonl"), purpose="batch"
    )
    assert anything.id.startswith("file-")
    assert [r.path for r in upstream.received if "/files" in r.path] == ["/v1/files"] * 3
