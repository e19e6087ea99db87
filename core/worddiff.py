"""Comparing two flows' words and JSON: pure functions, for the compare view and batch replays.

`word_diff` splits texts into words, spaces and punctuation and says, run by run, what is the
same, what only the first has and what only the second has. `json_changes` walks two JSON
documents and names each path whose value differs. `answer_text` finds the assistant's text in
a whole answer (chat, completions, Responses); a stream's is reassembled by the caller.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

TOKEN = re.compile(r"\w+\s*|[^\w\s]\s*|\s+", re.UNICODE)  # a word (or a sign) with the spaces after it
WORD_BLOCK = 400  # tokens a side: changed line blocks larger than this are shown whole, not word by word
MAX_LINES = 5_000  # lines a side compared: beyond, the rest is one run
MAX_CHANGES = 500


class Op(StrEnum):
    SAME = "same"
    REMOVED = "removed"  # only in the first
    ADDED = "added"  # only in the second


@dataclass(frozen=True)
class Run:
    op: Op
    text: str


def _merge(runs: list[Run], op: Op, text: str) -> None:
    if not text:
        return
    if runs and runs[-1].op == op:
        runs[-1] = Run(op, runs[-1].text + text)
    else:
        runs.append(Run(op, text))


def _words(runs: list[Run], a: str, b: str) -> None:
    left, right = TOKEN.findall(a), TOKEN.findall(b)
    if len(left) > WORD_BLOCK or len(right) > WORD_BLOCK:
        _merge(runs, Op.REMOVED, a)
        _merge(runs, Op.ADDED, b)
        return
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, left, right, autojunk=False).get_opcodes():
        if tag == "equal":
            _merge(runs, Op.SAME, "".join(left[i1:i2]))
        else:
            _merge(runs, Op.REMOVED, "".join(left[i1:i2]))
            _merge(runs, Op.ADDED, "".join(right[j1:j2]))


def _lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    if len(lines) > MAX_LINES:
        lines = [*lines[:MAX_LINES], "".join(lines[MAX_LINES:])]
    return lines


def _before(text: str, suffix: int) -> str:
    """The character before the last `suffix` ones ("" at the start)."""
    at = len(text) - suffix - 1
    return text[at] if at >= 0 else ""


def word_diff(a: str, b: str) -> list[Run]:
    """The runs that turn `a` into `b`: lines first, then word by word within the lines that changed (as
    `git diff --word-diff` does), so that the cost stays near linear for long answers; adjacent runs of
    one kind are merged."""
    runs: list[Run] = []
    prefix = len(os.path.commonprefix([a, b]))
    suffix = len(os.path.commonprefix([a[prefix:][::-1], b[prefix:][::-1]]))
    # Back to a word boundary, so that a changed word shows whole.
    while prefix and a[prefix - 1].isalnum() and (a[prefix : prefix + 1] + b[prefix : prefix + 1]).isalnum():
        prefix -= 1
    while suffix and a[len(a) - suffix].isalnum() and _before(a, suffix).isalnum() and _before(b, suffix).isalnum():
        suffix -= 1
    _merge(runs, Op.SAME, a[:prefix])
    left, right = _lines(a[prefix : len(a) - suffix]), _lines(b[prefix : len(b) - suffix])
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, left, right, autojunk=False).get_opcodes():
        if tag == "equal":
            _merge(runs, Op.SAME, "".join(left[i1:i2]))
        else:
            _words(runs, "".join(left[i1:i2]), "".join(right[j1:j2]))
    _merge(runs, Op.SAME, a[len(a) - suffix :] if suffix else "")
    return runs


def similarity(runs: list[Run]) -> float:
    """The share of characters the two texts have in common (1.0: identical)."""
    same = sum(len(r.text) for r in runs if r.op == Op.SAME)
    total = sum(len(r.text) * (2 if r.op == Op.SAME else 1) for r in runs)
    return 1.0 if total == 0 else round(2 * same / total, 4)


@dataclass(frozen=True)
class JsonChange:
    path: str  # e.g. messages[0].content; "" for the document itself
    a: Any  # the first's value (MISSING: absent)
    b: Any

    @property
    def kind(self) -> str:
        if self.a is MISSING:
            return "added"
        if self.b is MISSING:
            return "removed"
        return "changed"


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def _joined(path: str, key: str) -> str:
    return key if not path else f"{path}.{key}"


def json_changes(a: Any, b: Any, limit: int = MAX_CHANGES) -> list[JsonChange]:
    """Where two JSON documents differ, path by path (objects by key, lists by index), at most `limit`."""
    changes: list[JsonChange] = []

    def walk(path: str, x: Any, y: Any) -> None:
        if len(changes) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for key in list(x) + [k for k in y if k not in x]:
                walk(_joined(path, str(key)), x.get(key, MISSING), y.get(key, MISSING))
        elif isinstance(x, list) and isinstance(y, list):
            for i in range(max(len(x), len(y))):
                walk(f"{path}[{i}]", x[i] if i < len(x) else MISSING, y[i] if i < len(y) else MISSING)
        elif x != y or type(x) is not type(y):
            changes.append(JsonChange(path, x, y))

    walk("", a, b)
    return changes


def parsed(text: str | None) -> Any:
    """A body's JSON, or MISSING when it has none."""
    if not text:
        return MISSING
    try:
        return json.loads(text)
    except ValueError:
        return MISSING


def answer_text(document: Any) -> str | None:
    """The assistant's text in a whole answer: chat (`choices[].message.content`), completions
    (`choices[].text`) or Responses (`output[].content[].text`); None when it has none."""
    if not isinstance(document, dict):
        return None
    parts: list[str] = []
    for choice in document.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else choice.get("text")
        if isinstance(content, str):
            parts.append(content)
    for item in document.get("output") or ():
        for content in (item.get("content") or ()) if isinstance(item, dict) else ():
            if isinstance(content, dict) and isinstance(content.get("text"), str):
                parts.append(content["text"])
    return "".join(parts) if parts else None
