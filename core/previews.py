"""Short previews of a flow for the flows list: the prompt's last user message and the answer.

Computed once, in the writer thread, from the bodies as captured (core/records.py), and kept
as two short columns: the list never unpacks a body. Text only, whitespace collapsed, cut at
PREVIEW_CHARS; captured text is attacker-controlled, so the UI escapes it like any body.
"""

from __future__ import annotations

import json
from typing import Any

PREVIEW_CHARS = 120  # each: two previews add at most ~240 bytes (of ASCII) to a flow's row, which is about 2.8 KB
# Events read of a stream's body before giving up on it (a long stream's first ones hold the start).
MAX_EVENTS = 2000


def _clip(text: str) -> str | None:
    flat = " ".join(text.split())
    if not flat:
        return None
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1].rstrip() + "…"


def _text_of(content: Any) -> str:
    """A message's content: a string, or the text of its parts (chat's text, the Responses API's input_text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return " ".join(texts)
    return ""


def _last_user(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role", "user") == "user":
            text = _text_of(message.get("content"))
            if text:
                return text
    return ""


def prompt_preview(request: dict[str, Any]) -> str | None:
    """The last user message of a chat request, a Responses input, a completion's prompt, an embedding's input."""
    if isinstance(request.get("messages"), list):
        return _clip(_last_user(request["messages"]))
    for name in ("input", "prompt"):
        value = request.get(name)
        if isinstance(value, str):
            return _clip(value)
        if isinstance(value, list) and value:
            if all(isinstance(v, dict) for v in value):
                return _clip(_last_user(value))
            if isinstance(value[0], str):
                return _clip(value[-1])
    return None


def answer_preview(response: dict[str, Any]) -> str | None:
    """The answer of a chat completion, a completion or a Responses API response (the first choice)."""
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        message = first.get("message")
        if isinstance(message, dict):
            text = _text_of(message.get("content")) or _text_of(message.get("refusal"))
            if not text and message.get("tool_calls"):
                text = "[tool call]"
            return _clip(text)
        if isinstance(first.get("text"), str):
            return _clip(first["text"])
    if isinstance(response.get("output_text"), str):
        return _clip(response["output_text"])
    output = response.get("output")
    if isinstance(output, list):
        texts = [_text_of(item.get("content")) for item in output if isinstance(item, dict)]
        return _clip(" ".join(t for t in texts if t))
    return None


def stream_answer_preview(body: bytes) -> str | None:
    """The answer's start, from a stream's events: chat deltas, completion texts, Responses text deltas."""
    parts: list[str] = []
    length = 0
    for count, line in enumerate(body.splitlines()):
        if count > MAX_EVENTS * 2 or length > PREVIEW_CHARS:
            break
        if not line.startswith(b"data:") or b"{" not in line:
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            continue
        text = _delta_text(event) if isinstance(event, dict) else ""
        if text:
            parts.append(text)
            length += len(text)
    return _clip("".join(parts))


def _delta_text(event: dict[str, Any]) -> str:
    if event.get("type") == "response.output_text.delta":
        delta = event.get("delta")
        return delta if isinstance(delta, str) else ""
    choices = event.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        delta = first.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            return content if isinstance(content, str) else ""
        text = first.get("text")
        return text if isinstance(text, str) else ""
    return ""
