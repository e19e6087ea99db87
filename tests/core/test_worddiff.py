"""Word diffs and JSON changes for the compare view (core/worddiff.py)."""

from __future__ import annotations

import pytest

from core.worddiff import MISSING, Op, Run, answer_text, json_changes, similarity, word_diff


def test_words_that_differ_are_named_and_the_rest_is_kept():
    runs = word_diff("The cat sat on the mat.", "The dog sat on the mat!")
    assert runs == [
        Run(Op.SAME, "The "),
        Run(Op.REMOVED, "cat "),
        Run(Op.ADDED, "dog "),
        Run(Op.SAME, "sat on the mat"),
        Run(Op.REMOVED, "."),
        Run(Op.ADDED, "!"),
    ]
    assert "".join(r.text for r in runs if r.op != Op.ADDED) == "The cat sat on the mat."
    assert "".join(r.text for r in runs if r.op != Op.REMOVED) == "The dog sat on the mat!"


@pytest.mark.parametrize(
    "a, b, expected",
    [("", "", 1.0), ("same words", "same words", 1.0), ("abc", "xyz", 0.0), ("", "new", 0.0)],
)
def test_similarity(a, b, expected):
    assert similarity(word_diff(a, b)) == expected


def test_identical_texts_are_one_run_and_unicode_words_stay_whole():
    assert word_diff("héllo wörld", "héllo wörld") == [Run(Op.SAME, "héllo wörld")]
    assert (
        Run(Op.ADDED, "wörld") in word_diff("héllo", "héllo wörld")
        or word_diff("héllo", "héllo wörld")[-1].op == Op.ADDED
    )


def test_a_changed_word_shows_whole_and_long_texts_change_line_by_line():
    assert word_diff("say cats", "say bats") == [Run(Op.SAME, "say "), Run(Op.REMOVED, "cats"), Run(Op.ADDED, "bats")]
    a = "".join(f"line {n} of a long answer, with the same words again and again\n" for n in range(20_000))
    b = a.replace("line 12345 of", "row 12345 of")
    runs = word_diff(a, b)
    assert [r for r in runs if r.op != Op.SAME] == [Run(Op.REMOVED, "line"), Run(Op.ADDED, "row")]
    assert "".join(r.text for r in runs if r.op != Op.ADDED) == a
    assert "".join(r.text for r in runs if r.op != Op.REMOVED) == b
    repeated = "word " * 30_000
    assert word_diff(repeated, repeated + "end")[-1] == Run(Op.ADDED, "end")


def test_json_changes_name_each_path():
    a = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1, "gone": True}
    b = {"model": "m2", "messages": [{"role": "user", "content": "hi"}, {"role": "user"}], "n": 1.0, "new": None}
    changes = {c.path: c for c in json_changes(a, b)}
    assert set(changes) == {"model", "messages[1]", "n", "gone", "new"}
    assert changes["model"].kind == "changed" and changes["messages[1]"].kind == "added"
    assert changes["gone"].b is MISSING and changes["gone"].kind == "removed" and changes["new"].kind == "added"
    assert json_changes(a, a) == []
    assert len(json_changes(list(range(1000)), list(range(1, 1001)), limit=10)) == 10


@pytest.mark.parametrize(
    "document, text",
    [
        ({"choices": [{"message": {"content": "chat"}}]}, "chat"),
        ({"choices": [{"text": "completion"}]}, "completion"),
        ({"output": [{"content": [{"type": "output_text", "text": "responses"}]}]}, "responses"),
        ({"choices": [{"message": {"content": None}}]}, None),
        ({"data": []}, None),
        ([1, 2], None),
        (MISSING, None),
    ],
)
def test_answer_text(document, text):
    assert answer_text(document) == text
