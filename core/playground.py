"""The chat playground's pure parts: the request a conversation makes, and the answer read back as it streams.

The UI (monitor_ui/playground.py) keeps a conversation's turns; each new prompt sends the
system prompt, every earlier turn that was answered, and the prompt, through the proxy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TITLE_WORDS = 8
TITLE_CHARS = 80


@dataclass(frozen=True)
class Turn:
    """One prompt and what answered it (`answer` None: not answered, not sent again)."""

    prompt: str
    answer: str | None


def title_of(prompt: str) -> str:
    """The first words of a conversation's first prompt, for the history list."""
    words = prompt.split()
    title = " ".join(words[:TITLE_WORDS])
    if len(title) > TITLE_CHARS:
        title = title[: TITLE_CHARS - 1].rstrip() + "…"
    elif len(words) > TITLE_WORDS:
        title += " …"
    return title or "(empty prompt)"


def messages_of(system: str | None, turns: list[Turn], prompt: str) -> list[dict[str, str]]:
    """The chat messages for `prompt` after `turns`: the answered ones, in order, after the system prompt."""
    sent = [{"role": "system", "content": system}] if system else []
    for turn in turns:
        if turn.answer is not None:
            sent += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": turn.answer}]
    sent.append({"role": "user", "content": prompt})
    return sent


def chat_body(
    model: str,
    messages: list[dict[str, str]],
    *,
    stream: bool,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    if temperature is not None:
        body["temperature"] = temperature
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body, ensure_ascii=False).encode()


def _content(choice: Any, part: str) -> str:
    if not isinstance(choice, dict):
        return ""
    message = choice.get(part)
    text = message.get("content") if isinstance(message, dict) else None
    return text if isinstance(text, str) else ""


def error_message(body: bytes) -> str | None:
    """The message of an OpenAI-shaped error body, if it is one."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    message = error.get("message") if isinstance(error, dict) else error
    return message if isinstance(message, str) else None


@dataclass
class Answer:
    """The assistant's text, read from the proxy's answer as it passes: an event stream, or one JSON body."""

    stream: bool
    text: str = ""
    _pending: bytes = b""
    _body: list[bytes] = field(default_factory=list)

    def feed(self, chunk: bytes) -> None:
        if not self.stream:
            self._body.append(chunk)
            return
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            self._line(line.strip())

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            return
        choices = event.get("choices") if isinstance(event, dict) else None
        if isinstance(choices, list) and choices:
            self.text += _content(choices[0], "delta")

    def body(self) -> bytes:
        """What arrived (an answer that was not a stream: a JSON body, or an error)."""
        return b"".join(self._body) if not self.stream else self._pending

    def finish(self) -> str:
        """The whole text, once the answer has ended."""
        if self.stream:
            self._line(self._pending.strip())
            self._pending = b""
            return self.text
        try:
            choices = json.loads(self.body()).get("choices")
        except (ValueError, AttributeError):
            return self.text
        if isinstance(choices, list) and choices:
            self.text = _content(choices[0], "message")
        return self.text
