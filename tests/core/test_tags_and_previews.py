"""core/tags.py (the label headers) and core/previews.py (the list's previews), as tables."""

from __future__ import annotations

import json

import pytest

from core.previews import PREVIEW_CHARS, answer_preview, prompt_preview, stream_answer_preview
from core.tags import LabelError, Labels, labels_of, without_labels


def fields(*pairs: tuple[str, str]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((n.encode(), v.encode("latin-1")) for n, v in pairs)


@pytest.mark.parametrize(
    "headers, labels",
    [
        ((), None),
        ((("x-keyrotor-tags", "a,b"),), Labels(("a", "b"))),
        ((("X-Keyrotor-Tags", " a , ,b,a "),), Labels(("a", "b"))),
        ((("x-keyrotor-tags", "a"), ("x-keyrotor-tags", "team/ml,v1.2@x:y")), Labels(("a", "team/ml", "v1.2@x:y"))),
        ((("x-keyrotor-session", "conv-1"),), Labels((), "conv-1")),
        ((("x-keyrotor-session", "s"), ("x-keyrotor-session", "s")), Labels((), "s")),
        ((("x-keyrotor-tags", ""),), Labels(())),
    ],
)
def test_good_labels(headers, labels):
    assert labels_of(fields(*headers)) == labels


@pytest.mark.parametrize(
    "headers, header",
    [
        ((("x-keyrotor-tags", "a b"),), "x-keyrotor-tags"),
        ((("x-keyrotor-tags", "é"),), "x-keyrotor-tags"),
        ((("x-keyrotor-tags", "t" * 65),), "x-keyrotor-tags"),
        ((("x-keyrotor-tags", ",".join(str(i) for i in range(11))),), "x-keyrotor-tags"),
        ((("x-keyrotor-session", ""),), "x-keyrotor-session"),
        ((("x-keyrotor-session", "x" * 129),), "x-keyrotor-session"),
        ((("x-keyrotor-session", "a"), ("x-keyrotor-session", "b")), "x-keyrotor-session"),
        ((("x-keyrotor-session", "<script>"),), "x-keyrotor-session"),
    ],
)
def test_bad_labels_are_refused_with_an_openai_shaped_400(headers, header):
    with pytest.raises(LabelError) as raised:
        labels_of(fields(*headers))
    error = raised.value.error()
    assert error.status == 400 and header in error.message
    assert json.loads(error.body())["error"]["code"] == error.code == error.all_headers()["x-keyrotor-error"]


def test_without_labels_keeps_every_other_header_in_order():
    given = fields(("a", "1"), ("X-KEYROTOR-TAGS", "t"), ("b", "2"), ("x-keyrotor-session", "s"), ("x-keyrotor-x", "3"))
    assert without_labels(given) == fields(("a", "1"), ("b", "2"), ("x-keyrotor-x", "3"))


LONG = "word " * 100


@pytest.mark.parametrize(
    "request_body, preview",
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "a"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url"}]}]}, "x"),
        ({"messages": [{"role": "system", "content": "s"}]}, None),
        ({"input": "  spaced\n\nout  "}, "spaced out"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "r"}]}]}, "r"),
        ({"input": ["one", "two"]}, "two"),
        ({"prompt": "p"}, "p"),
        ({"input": [1, 2, 3]}, None),
        ({}, None),
    ],
)
def test_prompt_preview(request_body, preview):
    assert prompt_preview(request_body) == preview


def test_a_long_preview_is_cut_with_an_ellipsis():
    cut = prompt_preview({"prompt": LONG})
    assert cut is not None and len(cut) == PREVIEW_CHARS and cut.endswith("…")


@pytest.mark.parametrize(
    "response, preview",
    [
        ({"choices": [{"message": {"content": "hi"}}]}, "hi"),
        ({"choices": [{"message": {"content": None, "tool_calls": [{}]}}]}, "[tool call]"),
        ({"choices": [{"text": "done"}]}, "done"),
        ({"output_text": "ot"}, "ot"),
        ({"output": [{"content": [{"type": "output_text", "text": "o"}]}]}, "o"),
        ({"data": []}, None),
    ],
)
def test_answer_preview(response, preview):
    assert answer_preview(response) == preview


def test_stream_answer_preview_joins_deltas():
    events = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {"type": "response.output_text.delta", "delta": "!"},
    ]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    assert stream_answer_preview(body.encode()) == "Hello!"
    assert stream_answer_preview(b"data: {broken\n\n") is None
