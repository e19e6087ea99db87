"""The playground's pure parts (core/playground.py): what a conversation sends, and the answer read as it passes."""

from __future__ import annotations

import json

import pytest

from core.playground import Answer, Turn, chat_body, error_message, messages_of, title_of


@pytest.mark.parametrize(
    ("prompt", "title"),
    [
        ("Hello there", "Hello there"),
        ("  one\ntwo\tthree  ", "one two three"),
        ("a b c d e f g h i j", "a b c d e f g h …"),
        ("x" * 200, "x" * 79 + "…"),
        ("   ", "(empty prompt)"),
    ],
)
def test_a_conversation_is_named_by_its_first_words(prompt: str, title: str):
    assert title_of(prompt) == title


def test_only_answered_turns_are_sent_again_after_the_system_prompt():
    turns = [Turn("first", "one"), Turn("refused", None), Turn("second", "")]
    assert messages_of("Be brief.", turns, "third") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "third"},
    ]
    assert messages_of(None, [], "hi") == [{"role": "user", "content": "hi"}]


def test_the_body_names_only_what_was_chosen():
    assert json.loads(chat_body("m", [], stream=True)) == {"model": "m", "messages": [], "stream": True}
    body = json.loads(chat_body("m", [], stream=False, temperature=0.0, max_tokens=5))
    assert body["temperature"] == 0.0 and body["max_tokens"] == 5 and body["stream"] is False


def event(content: str | None, **extra) -> bytes:
    delta = {"content": content} if content is not None else {}
    return b"data: " + json.dumps({"choices": [{"delta": delta}], **extra}).encode() + b"\n\n"


def test_a_streamed_answer_is_read_across_any_cut_of_its_bytes():
    stream = (
        event("Hel") + b": a comment\n\n" + event("lo ") + event(None) + event("<b>wörld</b>") + b"data: [DONE]\n\n"
    )
    for size in (1, 2, 7, len(stream)):
        answer = Answer(stream=True)
        for start in range(0, len(stream), size):
            answer.feed(stream[start : start + size])
        assert answer.finish() == "Hello <b>wörld</b>"


def test_a_stream_without_a_final_newline_and_with_garbage_still_gives_its_text():
    answer = Answer(stream=True)
    answer.feed(b"data: {not json}\n" + b'data: {"choices": []}\n' + b'data: {"choices":[{"delta":{"content":"end"}}]}')
    assert answer.finish() == "end"


def test_a_plain_answer_and_an_error():
    answer = Answer(stream=False)
    for piece in (b'{"choices":[{"message":{"role":"assistant",', b'"content":"whole"}}]}'):
        answer.feed(piece)
    assert answer.finish() == "whole"
    refused = Answer(stream=False)
    refused.feed(b'{"error": {"message": "over budget", "code": "insufficient_quota"}}')
    assert refused.finish() == "" and error_message(refused.body()) == "over budget"
    assert error_message(b"<html>bad gateway</html>") is None
    assert error_message(b'{"error": "plain"}') == "plain"
