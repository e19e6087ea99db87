"""Budgets that hold, end to end: the official openai client (and a WebSocket client for Realtime)
→ a real mitmproxy running keyrotor → the fake upstream.

A stream the client leaves is charged what upstream produced until then; a Realtime session is
charged as each response ends and closed when its client may not go on; requests in flight at
once cannot overrun a budget by more than one request.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

import openai
import pytest
import websockets

from core import tokens
from tests.conftest import Keyrotor, wait_for
from tests.fake_upstream import FakeUpstream
from tests.test_realtime_integration import HELLO, converse, ws_url

GOOD = ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-bbbbbbbbbbbbbbbbbbbbbbbbbbbb0002"]
MESSAGES = [{"role": "user", "content": "Say hello to the proxy"}]


def client_for(kr: Keyrotor, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=20)


def new_client(kr: Keyrotor, name: str, *limits: str) -> str:
    return kr.setup("clients", "add", name, *limits).stdout.strip().splitlines()[-1]


def rows(kr: Keyrotor):
    return kr.query("SELECT * FROM flows ORDER BY id")


def produced_text(events: list[bytes]) -> str:
    """The reply text of the events upstream sent."""
    return "".join(tokens.completion_texts(b"".join(events)))


def refused_for_budget(kr: Keyrotor, key: str) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as raised:
        client_for(kr, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raised.value.code == "insufficient_quota"
    return raised.value


@pytest.fixture
def kr(keyrotor: Keyrotor) -> Keyrotor:
    keyrotor.add_keys(*GOOD)
    return keyrotor


def test_a_stream_left_mid_way_is_charged_what_passed_and_upstream_is_hung_up_on(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "leaver", "--daily-tokens", "20")
    upstream.stream_chunks, upstream.stream_delay = 60, 0.1
    kr.start_proxy()
    stream = client_for(kr, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    seen = ""
    for chunk in stream:
        seen += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        if seen.count(" ") >= 20:
            break
    stream.close()  # the client hangs up a third of the way in

    row = wait_for(lambda: (r := rows(kr)) and r[0], what="the left stream's row")
    assert "counted by keyrotor (the o200k_base tokenizer)" in row["error"]
    (sent,) = upstream.streams
    time.sleep(1.0)  # the behaviour under test is that nothing more comes: give it time to
    assert len(sent) < 40, "upstream went on generating after the client left"  # it left at about 21
    assert not any(b'"usage": {' in e for e in sent), "upstream reached its usage chunk"
    produced = len(tokens.encoder("o200k_base").encode_ordinary(produced_text(sent)))  # type: ignore[union-attr]
    # What passed to the client is what upstream produced, less at most the chunks in flight.
    assert produced - 6 <= row["completion_tokens"] <= produced
    assert row["completion_tokens"] >= len(tokens.encoder("o200k_base").encode_ordinary(seen))  # type: ignore[union-attr]
    assert row["prompt_tokens"] > 0 and row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    print(f"\nleft mid-way: produced {produced} completion tokens, charged {row['completion_tokens']}")

    error = refused_for_budget(kr, key)  # the left stream spent the budget
    assert "daily token budget of 20 tokens is spent" in error.message
    assert len(upstream.received) == 1


def test_a_stream_left_after_its_finish_chunk_is_charged_its_whole_reply(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "quick", "--daily-tokens", "25")
    upstream.stream_chunks, upstream.usage_delay = 5, 3.0  # the usage chunk comes 3 s after the finish chunk
    kr.start_proxy()
    stream = client_for(kr, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    text = ""
    for chunk in stream:
        text += chunk.choices[0].delta.content or ""
        if chunk.choices[0].finish_reason:
            break
    stream.close()

    row = wait_for(lambda: (r := rows(kr)) and r[0], what="the left stream's row")
    assert "counted by keyrotor" in row["error"] and "Client disconnected" in row["error"]
    encoder = tokens.encoder("o200k_base")
    assert encoder is not None
    assert row["completion_tokens"] == len(encoder.encode_ordinary(text))
    prompt = len(encoder.encode_ordinary("user")) + len(encoder.encode_ordinary(MESSAGES[0]["content"])) + 3 + 3
    assert row["prompt_tokens"] == prompt
    (sent,) = upstream.streams
    assert not any(b'"usage": {' in e for e in sent)
    print(f"\nleft after finish: produced {row['completion_tokens']} completion tokens, charged the same")
    refused_for_budget(kr, key)


def test_a_stream_retried_on_another_key_is_charged_its_answer(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "retried", "--daily-tokens", "20")
    upstream.set_key(GOOD[0], "disconnect", times=1)  # the first attempt breaks off: the answer comes whole
    kr.start_proxy()
    stream = client_for(kr, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    (row,) = wait_for(lambda: rows(kr), what="the row")
    assert row["attempts"] == 2 and row["error"] is None and row["total_tokens"] >= 20
    refused_for_budget(kr, key)  # its usage was charged, not the broken attempt's nothing


def test_parallel_streams_cannot_overrun_a_budget_by_more_than_one_request(kr: Keyrotor, upstream: FakeUpstream):
    budget = 200
    key = new_client(kr, "crowd", "--daily-tokens", str(budget))
    upstream.stream_chunks, upstream.stream_delay = 5, 0.2
    kr.start_proxy()

    async def crowd() -> list[int]:
        client = openai.AsyncOpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=30)

        async def one() -> int:
            try:
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=30
                )
                async for _ in stream:
                    pass
                return 200
            except openai.APIStatusError as e:
                assert e.code == "insufficient_quota", e.message
                return e.status_code

        try:
            return await asyncio.gather(*(one() for _ in range(40)))
        finally:
            await client.close()

    statuses = asyncio.run(crowd())
    served = statuses.count(200)
    recorded = wait_for(lambda: len(r := rows(kr)) == 40 and r, what="40 rows")
    charged = sum(r["total_tokens"] or 0 for r in recorded)
    largest = max(r["total_tokens"] or 0 for r in recorded)
    print(f"\n40 parallel streams, budget {budget}: {served} served, {charged} tokens charged")
    assert 1 <= served < 40 and statuses.count(429) == 40 - served
    assert charged - budget <= largest  # at most one request's worth over


def test_a_realtime_session_is_charged_per_response_and_closed_when_over_budget(kr: Keyrotor, upstream: FakeUpstream):
    key = new_client(kr, "talker", "--daily-tokens", "40")
    upstream.stream_chunks = 3
    kr.start_proxy()
    headers = {"Authorization": f"Bearer {key}"}

    async def session() -> tuple[list[dict], int | None]:
        heard: list[dict] = []
        used = 0
        async with websockets.connect(ws_url(kr), additional_headers=headers) as ws:
            await ws.recv()  # session.created
            try:
                while used < 40:  # each response uses about 20 tokens: the second spends the budget
                    await ws.send(json.dumps(HELLO))
                    await ws.send(json.dumps({"type": "response.create"}))
                    while (event := json.loads(await ws.recv()))["type"] != "response.done":
                        heard.append(event)
                    heard.append(event)
                    used += event["response"]["usage"]["total_tokens"]
                while True:  # nothing more is asked: what comes now is keyrotor's
                    heard.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
            except websockets.ConnectionClosed as closed:
                return heard, closed.rcvd.code if closed.rcvd else None

    heard, code = asyncio.run(session())
    done = [e for e in heard if e["type"] == "response.done"]
    used = sum(e["response"]["usage"]["total_tokens"] for e in done)
    assert len(done) == 2 and used >= 40 > done[0]["response"]["usage"]["total_tokens"]
    assert heard[-1]["type"] == "error" and heard[-1]["error"]["code"] == "insufficient_quota"
    assert code == 1008
    row = wait_for(lambda: (r := rows(kr)) and r[0], what="the session's row")
    assert row["refusal"] == "insufficient_quota" and row["total_tokens"] == used
    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(converse(ws_url(kr), additional_headers=headers))
    assert refused.value.response.status_code == 429


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda kr: kr.setup("clients", "set", "open", "--expires", _iso(time.time() + 2)), "key_expired"),
        (lambda kr: kr.setup("clients", "disable", "open"), "invalid_api_key"),
        (lambda kr: kr.setup("clients", "keys", "open", "revoke", "1"), "invalid_api_key"),
    ],
    ids=["expiry", "disabled", "revoked"],
)
def test_a_realtime_session_is_closed_when_its_client_may_no_longer_use_it(
    kr: Keyrotor, upstream: FakeUpstream, change, code
):
    key = new_client(kr, "open")
    kr.start_proxy()

    async def session() -> tuple[list[dict], float, int | None]:
        heard: list[dict] = []
        async with websockets.connect(ws_url(kr), additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            heard.append(json.loads(await ws.recv()))  # session.created: the session is open
            change(kr)
            started = time.monotonic()
            try:
                while True:
                    heard.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            except websockets.ConnectionClosed as closed:
                return heard, time.monotonic() - started, closed.rcvd.code if closed.rcvd else None

    heard, after, close_code = asyncio.run(session())
    assert heard[-1]["type"] == "error" and heard[-1]["error"]["code"] == code
    assert close_code == 1008 and after < 6
    row = wait_for(lambda: (r := rows(kr)) and r[0], what="the session's row")
    assert row["refusal"] == code
