"""Trace probes (docs/traces.md): who fetches the image a request names, and what the answer says.

A trace sends a vision chat request through one group; its image URL points at keyrotor's
trace listener with a fresh unguessable id. Every fetch of that URL is recorded; after the
answer and a grace period the verdict says who fetched it, whether the answer mentions the
image, and which model and system_fingerprint the answer names. The decisions here are pure.
"""

from __future__ import annotations

import json
import re
import secrets
import struct
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

IMAGE_PATH = "/api/img"
TRACE_ID_BYTES = 24  # token_urlsafe(24): 32 characters, 192 bits
MAX_TRACE_ID_LENGTH = 64
MAX_FETCHES_PER_TRACE = 20  # fetches recorded per trace; later ones are served but not kept
MAX_HEADER_BYTES = 8192  # of a fetch's headers, as stored
MAX_HEADER_VALUE = 1024
MAX_USER_AGENT = 512
ANSWER_EXCERPT = 2000
PROMPT = "What is in this image? Answer in one short sentence."
# "Mentions the image": the answer names an image, or what this one shows (a red square).
# A heuristic: a model that says "I cannot see images" mentions it too; read the answer.
IMAGE_WORDS = ("image", "picture", "photo", "pixel", "red", "square", "colour", "color")
_WORD = re.compile(r"[a-z]+")


def new_trace_id() -> str:
    return secrets.token_urlsafe(TRACE_ID_BYTES)


def valid_trace_id(text: str) -> bool:
    """Whether `text` could be a trace id at all (checked before any lookup)."""
    return 0 < len(text) <= MAX_TRACE_ID_LENGTH and all(c.isascii() and (c.isalnum() or c in "-_") for c in text)


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


IMAGE = _png(16, 16, (220, 30, 30))  # a red square: small, valid, easy to describe


def image_url(public_url: str, trace_id: str) -> str:
    return f"{public_url.rstrip('/')}{IMAGE_PATH}?{urlencode({'traceid': trace_id})}"


def request_body(model: str, url: str) -> bytes:
    """The trace's chat request: one user turn with a question and the image."""
    content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": url}}]
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 100}).encode()


@dataclass(frozen=True)
class Answer:
    """What a trace keeps of the chat answer."""

    status: int
    model: str | None = None
    system_fingerprint: str | None = None
    text: str = ""
    error: str | None = None


def read_answer(status: int, body: bytes) -> Answer:
    """The model, system_fingerprint and text an answer names (or its error message)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        return Answer(status, error=None if status == 200 else body[:300].decode("utf-8", "replace"))
    text = ""
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            text = message["content"]
    error = data.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return Answer(
        status,
        _short(data.get("model")),
        _short(data.get("system_fingerprint")),
        text[:ANSWER_EXCERPT],
        str(message)[:300] if message else (None if status == 200 else f"HTTP {status}"),
    )


def _short(value: Any) -> str | None:
    return str(value)[:200] if isinstance(value, str | int) and value != "" else None


def mentions_image(text: str) -> bool:
    return any(word in IMAGE_WORDS for word in _WORD.findall(text.lower()))


def bounded_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A fetch's headers as stored: each value cut to MAX_HEADER_VALUE, all to MAX_HEADER_BYTES."""
    kept: list[tuple[str, str]] = []
    size = 0
    for name, value in headers:
        name, value = name[:100], value[:MAX_HEADER_VALUE]
        size += len(name) + len(value) + 4
        if size > MAX_HEADER_BYTES:
            kept.append(("x-keyrotor-note", "more headers not kept"))
            break
        kept.append((name, value))
    return kept


@dataclass(frozen=True)
class Fetcher:
    address: str
    user_agents: tuple[str, ...]
    fetches: int
    first_delay_seconds: float | None


@dataclass(frozen=True)
class Verdict:
    state: str  # "pending" (no answer or grace not over yet), "no fetch", "fetched"
    summary: str
    fetchers: tuple[Fetcher, ...] = ()
    mentions_image: bool | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    model_differs: bool = False


def verdict(
    requested_model: str,
    finished: bool,
    fetches: Iterable[Mapping[str, Any]],
    answer_text: str | None,
    answer_model: str | None,
    fingerprint: str | None,
) -> Verdict:
    """The trace's verdict from its fetches (address, user_agent, delay_seconds) and its answer."""
    by_address: dict[str, list[Mapping[str, Any]]] = {}
    for fetch in fetches:
        by_address.setdefault(str(fetch["address"]), []).append(fetch)
    fetchers = tuple(
        Fetcher(
            address,
            tuple(dict.fromkeys(str(f["user_agent"] or "") for f in found)),
            len(found),
            min((f["delay_seconds"] for f in found if f["delay_seconds"] is not None), default=None),
        )
        for address, found in by_address.items()
    )
    mentions = mentions_image(answer_text) if answer_text is not None else None
    differs = bool(answer_model) and not _same_model(requested_model, answer_model or "")
    if fetchers:
        count = len(fetchers)
        state, summary = "fetched", f"fetched by {count} distinct address{'es' if count > 1 else ''}"
        summary += "" if finished else " (so far)"
    elif finished:
        state, summary = "no fetch", "no fetch"
    else:
        state, summary = "pending", "waiting for the answer and the grace period"
    return Verdict(state, summary, fetchers, mentions, answer_model, fingerprint, differs)


def _same_model(requested: str, named: str) -> bool:
    """An answer names a dated snapshot of the model asked for (gpt-4o → gpt-4o-2024-08-06, gpt-4 →
    gpt-4-0613): the same. gpt-4o → gpt-4o-mini is not."""
    requested, named = requested.lower(), named.lower()
    return named == requested or bool(re.fullmatch(re.escape(requested) + r"-(\d{4}-\d{2}-\d{2}|\d{4})", named))


@dataclass
class AddressLimiter:
    """At most `per_minute` requests from one address in any 60 seconds; remembers at most `max_addresses`."""

    per_minute: int
    max_addresses: int = 10_000
    _seen: dict[str, deque[float]] = field(default_factory=dict)

    def allow(self, address: str, now: float) -> bool:
        if len(self._seen) > self.max_addresses:
            self._seen = {a: q for a, q in self._seen.items() if q and q[-1] > now - 60}
            if len(self._seen) > self.max_addresses:
                self._seen.clear()  # flooded from too many addresses to track: start over
        times = self._seen.setdefault(address, deque())
        while times and times[0] <= now - 60:
            times.popleft()
        if len(times) >= self.per_minute:
            return False
        times.append(now)
        return True
