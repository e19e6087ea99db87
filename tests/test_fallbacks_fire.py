"""Fallback models that fire (issue 20 §2), end to end: the official openai client → a real
mitmproxy running keyrotor → the fake upstream, whose faults follow a model (tests/fake_faults.py).

The default group serves every model, so a model's fallback is served by the same group, on the
same keys: only the model differs. Every client uses max_retries=0.
"""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.conftest import Keyrotor
from tests.fake_upstream import FakeUpstream
from tests.test_failover_faults import KEYS, chats, client_for, outcome, recorded

PRIMARY, FALLBACK = "gpt-4o", "gpt-4o-mini"


def started_with_fallback(kr: Keyrotor, *keys: str, settings: tuple[str, ...] = ()) -> openai.OpenAI:
    kr.setup("models", "fallback", PRIMARY, FALLBACK)
    client_key = kr.start_serving(*keys, proxy_args=tuple(item for s in settings for item in ("--set", s)))
    return client_for(kr, client_key)


def asked(client: openai.OpenAI, stream: bool = False) -> str:
    """The model that answered a request for PRIMARY, as the client reads it."""
    messages = [{"role": "user", "content": "hello"}]
    if not stream:
        return client.chat.completions.create(model=PRIMARY, messages=messages).model
    chunks = list(client.chat.completions.create(model=PRIMARY, messages=messages, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    return chunks[-1].model


def models_asked(upstream: FakeUpstream) -> list[str]:
    return [json.loads(r.body)["model"] for r in chats(upstream)]


def test_a_fallback_served_by_the_same_group_answers_when_the_model_is_down(keyrotor: Keyrotor, upstream: FakeUpstream):
    upstream.faults.model_faults[PRIMARY] = "unavailable"  # 503 on every key
    client = started_with_fallback(keyrotor, *KEYS[:2])
    assert asked(client) == FALLBACK
    assert asked(client, stream=True) == FALLBACK
    (first, second) = recorded(keyrotor, 2, "SELECT model, fallback_model, status FROM flows ORDER BY id")
    assert [tuple(first), tuple(second)] == [(PRIMARY, FALLBACK, 200)] * 2
    # Two keys fail the primary the same way (it follows the model), then the fallback answers.
    assert models_asked(upstream) == [PRIMARY, PRIMARY, FALLBACK] * 2


def test_a_prompt_too_long_for_the_model_goes_to_its_fallback(keyrotor: Keyrotor, upstream: FakeUpstream):
    upstream.faults.model_faults[PRIMARY] = "context_length"  # a short context, on every key
    client = started_with_fallback(keyrotor, *KEYS[:2])
    assert asked(client) == FALLBACK
    assert models_asked(upstream) == [PRIMARY, FALLBACK]  # no second key of the same model: same context
    # Other 400s are the request's own and never go to a fallback.
    del upstream.faults.model_faults[PRIMARY]
    filtered = [{"role": "user", "content": "#fault:content_filter"}]
    assert outcome(lambda: client.chat.completions.create(model=PRIMARY, messages=filtered)) == "BadRequestError 400"
    assert models_asked(upstream) == [PRIMARY, FALLBACK, PRIMARY]
    rows = recorded(keyrotor, 2, "SELECT fallback_model, status FROM flows ORDER BY id")
    assert [tuple(r) for r in rows] == [(FALLBACK, 200), (None, 400)]


def test_a_silent_model_goes_to_its_fallback_after_one_timeout(keyrotor: Keyrotor, upstream: FakeUpstream):
    upstream.faults.model_faults[PRIMARY] = "hang"  # never answers, on any key
    client = started_with_fallback(keyrotor, *KEYS[:3], settings=("keypool.attempt_timeout_seconds=2",))
    began = time.monotonic()
    assert asked(client) == FALLBACK
    assert asked(client, stream=True) == FALLBACK
    # One silent attempt each, not one per key of the same upstream: 2 s each, not 6 (12 s in all).
    assert models_asked(upstream) == [PRIMARY, FALLBACK] * 2
    assert time.monotonic() - began < 10


def test_one_round_of_429s_without_retry_after_goes_back_to_the_client(keyrotor: Keyrotor, upstream: FakeUpstream):
    upstream.faults.model_faults[PRIMARY] = "ratelimit_nohint"  # no fallback: nowhere else to go
    client = client_for(
        keyrotor, keyrotor.start_serving(*KEYS[:3], proxy_args=("--set", "keypool.wait_max_seconds=20"))
    )
    began = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=PRIMARY, messages=[{"role": "user", "content": "hello"}])
    assert time.monotonic() - began < 5  # not rounds of waits within wait_max_seconds
    assert models_asked(upstream) == [PRIMARY] * 3  # one round: each key once
    assert caught.value.code == "rate_limit_exceeded"  # upstream's own 429…
    assert int(caught.value.response.headers["retry-after"]) >= 1  # …saying when a key is back


def test_a_stream_without_its_first_token_in_time_goes_to_the_fallback(keyrotor: Keyrotor, upstream: FakeUpstream):
    upstream.faults.model_faults[PRIMARY] = "slow_first"  # headers at once, the first token after 1.5 s
    settings = ("keypool.first_token_seconds=1", "keypool.attempt_timeout_seconds=30")
    client = started_with_fallback(keyrotor, *KEYS[:2], settings=settings)
    began = time.monotonic()
    assert asked(client, stream=True) == FALLBACK
    assert time.monotonic() - began < 10  # the first attempt given up after 1 s, not after attempt_timeout
    assert models_asked(upstream) == [PRIMARY, FALLBACK]
    (row,) = recorded(keyrotor, 1, "SELECT fallback_model, status, attempts FROM flows")
    assert tuple(row) == (FALLBACK, 200, 2)
