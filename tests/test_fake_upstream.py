"""Self-tests of the fake OpenAI upstream, driven by the official client."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

try:  # tests/ may or may not become a package
    from tests.fake_upstream import FakeUpstream
except ImportError:
    from fake_upstream import FakeUpstream

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello to me please"},
]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream().start() as up:
        yield up


@pytest.fixture
def up(server: FakeUpstream) -> FakeUpstream:
    server.reset()
    server.stream_chunks, server.stream_delay = 5, 0.0
    return server


def client(up: FakeUpstream, key: str = "sk-good-1") -> OpenAI:
    # No retries: the tests want to see each error exactly once.
    return OpenAI(base_url=up.url + "/v1", api_key=key, max_retries=0)


def test_streamed_and_plain_replies_match(up: FakeUpstream) -> None:
    c = client(up)
    plain = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    stream = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = list(stream)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    text = plain.choices[0].message.content
    assert text == streamed
    assert "5 words" in text
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None
    assert plain.usage.prompt_tokens == 2 + 5 + 2 * 7
    assert plain.usage.completion_tokens == len(text.split())
    # role chunk, 5 content chunks, finish chunk
    assert len(chunks) == 7
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert up.keys_seen() == ["sk-good-1", "sk-good-1"]


def test_include_usage_sends_final_usage_chunk(up: FakeUpstream) -> None:
    stream = client(up).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_ratelimit_once_then_served(up: FakeUpstream) -> None:
    up.set_key("sk-good-2", "ratelimit", times=1, retry_after="7")
    c = client(up, "sk-good-2")
    with pytest.raises(openai.RateLimitError) as caught:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
    assert up.keys_seen() == ["sk-good-2", "sk-good-2"]


def test_invalid_key(up: FakeUpstream) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(up, "sk-invalid-key-1234").models.list()
    assert caught.value.code == "invalid_api_key"
    assert "sk-inv********************1234" in caught.value.message
    assert caught.value.response.headers["x-request-id"].startswith("req_")


def test_quota(up: FakeUpstream) -> None:
    up.set_key("sk-good-3", "quota")
    with pytest.raises(openai.RateLimitError) as caught:
        client(up, "sk-good-3").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.code == "insufficient_quota"
    assert "retry-after" not in caught.value.response.headers


def test_other_behaviours(up: FakeUpstream) -> None:
    up.set_key("sk-good-4", "deactivated")
    up.set_key("sk-good-5", "server_error", times=1)
    with pytest.raises(openai.AuthenticationError) as caught:
        client(up, "sk-good-4").models.list()
    assert caught.value.code == "account_deactivated"
    with pytest.raises(openai.InternalServerError):
        client(up, "sk-good-5").models.list()
    assert client(up, "sk-good-5").models.list().data


def test_streamed_chunks_are_spaced_out(up: FakeUpstream) -> None:
    up.stream_chunks, up.stream_delay = 3, 0.2
    stream = client(up).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    arrivals = [time.monotonic() for ch in stream if ch.choices and ch.choices[0].delta.content]
    assert len(arrivals) == 3
    assert arrivals[-1] - arrivals[0] >= 0.3


def test_raw_http_edges(up: FakeUpstream) -> None:
    auth = {"authorization": "Bearer sk-bench-1"}
    with httpx.Client(base_url=up.url) as http:
        no_key = http.get("/v1/models")
        missing = http.post("/v1/whatever", headers=auth)
        bad = http.post("/v1/chat/completions", headers=auth, json={"messages": MESSAGES})
        emb = http.post(
            "/v1/embeddings",
            headers={"api-key": "sk-bench-2"},
            json={"model": "m", "input": ["a b", "c"]},
        )
        stream = http.post(
            "/v1/chat/completions",
            headers=auth,
            json={"model": "m", "messages": MESSAGES, "stream": True},
        )
    assert no_key.status_code == 401
    assert no_key.json()["error"]["message"].startswith("You didn't provide an API key.")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "Invalid URL (POST /v1/whatever)"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    assert bad.headers["content-type"] == "application/json"
    assert emb.status_code == 200
    assert [len(d["embedding"]) for d in emb.json()["data"]] == [8, 8]
    assert emb.json()["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert stream.headers["content-type"] == "text/event-stream"
    assert stream.text.endswith("data: [DONE]\n\n")
    assert [r.key for r in up.received] == [
        None,
        "sk-bench-1",
        "sk-bench-1",
        "sk-bench-2",
        "sk-bench-1",
    ]
    assert up.received[1].method == "POST" and up.received[1].path == "/v1/whatever"
    assert up.keys_seen() == ["sk-bench-1", "sk-bench-1", "sk-bench-2", "sk-bench-1"]


def test_embeddings_via_client(up: FakeUpstream) -> None:
    result = client(up).embeddings.create(model="text-embedding-3-small", input="hello there")
    assert len(result.data[0].embedding) == 8
    assert result.usage.prompt_tokens == 2


def test_main_prints_ready_and_stops_on_sigterm() -> None:
    script = Path(__file__).with_name("fake_upstream.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--stream-chunks", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("READY http://127.0.0.1:")
        url = line.removeprefix("READY ")
        models = httpx.get(url + "/v1/models", headers={"authorization": "Bearer sk-good-x"})
        assert models.json()["data"][0]["id"] == "gpt-4o-mini"
        proc.terminate()
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_responses_stream_and_plain_answers_match(up: FakeUpstream) -> None:
    c = client(up)
    plain = c.responses.create(model="gpt-4o-mini", input="Say hello to me please")
    events = list(c.responses.create(model="gpt-4o-mini", input="Say hello to me please", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    assert events[-1].type == "response.completed" and events[-1].response.usage == plain.usage
    raw = httpx.post(
        up.url + "/v1/responses",
        json={"model": "gpt-4o-mini", "input": "hi", "stream": True},
        headers={"authorization": "Bearer sk-good-1"},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.startswith("event: response.created\ndata: {")  # each event named twice, as OpenAI does


def test_speech_is_chunked_audio_and_uploads_need_a_file(up: FakeUpstream) -> None:
    with httpx.stream(
        "POST",
        up.url + "/v1/audio/speech",
        json={"model": "tts-1", "voice": "alloy", "input": "hi"},
        headers={"authorization": "Bearer sk-good-1"},
    ) as speech:
        assert speech.headers["content-type"] == "audio/mpeg" and "content-length" not in speech.headers
        assert speech.read().startswith(b"ID3")
    no_file = httpx.post(
        up.url + "/v1/audio/transcriptions",
        files={"model": (None, "whisper-1")},  # a form, but without its file
        headers={"authorization": "Bearer sk-good-1"},
    )
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    text = client(up).audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"), response_format="text")
    assert "4 bytes of a.wav" in text


def test_a_request_fault_once_fails_the_first_attempt_only(up: FakeUpstream) -> None:
    c = client(up)
    for mark in ("1", "2"):  # each request (its own mark) fails once, then is served
        text = [{"role": "user", "content": f"#fault:server_error_once/{mark}"}]
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model="gpt-4o-mini", messages=text)
        assert c.chat.completions.create(model="gpt-4o-mini", messages=text).choices
    reset = [{"role": "user", "content": "#fault:reset_once/3"}]
    with pytest.raises(openai.APIConnectionError) as caught:
        c.chat.completions.create(model="gpt-4o-mini", messages=reset)
    assert "Connection reset by peer" in str(caught.value.__cause__)  # ECONNRESET: no byte of an answer
    assert c.chat.completions.create(model="gpt-4o-mini", messages=reset).choices


def test_a_model_rate_limited_with_retry_after_and_a_slow_first_token(up: FakeUpstream) -> None:
    c = client(up)
    up.faults.model_faults["gpt-4o"] = "ratelimit"
    with pytest.raises(openai.RateLimitError) as caught:
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "1"
    assert c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices  # other models are served
    up.faults.model_faults["gpt-4o"] = "slow_first"
    up.faults.first_token_seconds = 0.5
    began = time.monotonic()
    stream = c.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert next(iter(stream)).choices and time.monotonic() - began >= 0.5
