"""What an answer says a request used, whichever endpoint answered, as one typed `Usage`.

Each OpenAI endpoint words its usage its own way: chat and completions say
`prompt_tokens`/`completion_tokens`; the Responses API, image generation and Realtime say
`input_tokens`/`output_tokens` with `input_tokens_details` (Realtime and transcription:
`input_token_details`); Whisper says `{"type": "duration", "seconds": …}`. Some answers
carry none at all, and are metered from the request: images by their count and size,
speech by the characters of its input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None  # of the prompt tokens, read from cache
    reasoning_tokens: int | None = None  # of the completion tokens
    audio_input_tokens: int | None = None  # of the prompt tokens
    cached_audio_tokens: int | None = None  # of the audio prompt tokens, read from cache
    audio_output_tokens: int | None = None  # of the completion tokens
    image_input_tokens: int | None = None  # of the prompt tokens
    audio_seconds: float | None = None  # of audio transcribed or translated
    characters: int | None = None  # of text spoken (speech)
    images: int | None = None  # made
    image_size: str | None = None
    image_quality: str | None = None

    def __add__(self, other: Usage) -> Usage:
        """Two answers' usage together (a Realtime session's responses)."""
        summed = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, str) or isinstance(theirs, str):
                summed[f.name] = mine or theirs
            else:
                summed[f.name] = None if mine is None and theirs is None else (mine or 0) + (theirs or 0)
        return Usage(**summed)


NO_USAGE = Usage()


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _details(usage: dict[str, Any], *names: str) -> dict[str, Any]:
    for name in names:
        value = usage.get(name)
        if isinstance(value, dict):
            return value
    return {}


def usage_of(usage: Any) -> Usage:
    """The `usage` object of any OpenAI answer, read into one shape; empty when it is not one."""
    if not isinstance(usage, dict):
        return Usage()
    if usage.get("type") == "duration":  # Whisper: billed by the second
        seconds = usage.get("seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
            return Usage(audio_seconds=float(seconds))
        return Usage()
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if prompt is None and completion is None:
        prompt, completion = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
    total = _int(usage.get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    given = _details(usage, "prompt_tokens_details", "input_tokens_details", "input_token_details")
    made = _details(usage, "completion_tokens_details", "output_tokens_details", "output_token_details")
    cached_details = _details(given, "cached_tokens_details")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cached_tokens=_int(given.get("cached_tokens")),
        reasoning_tokens=_int(made.get("reasoning_tokens")),
        audio_input_tokens=_int(given.get("audio_tokens")),
        cached_audio_tokens=_int(cached_details.get("audio_tokens")),
        audio_output_tokens=_int(made.get("audio_tokens")),
        image_input_tokens=_int(given.get("image_tokens")),
    )


def summed(usages: Iterable[Usage]) -> Usage:
    total = Usage()
    for usage in usages:
        total = total + usage
    return total


# Endpoints metered from the request when the answer carries no usage.
SPEECH = "/audio/speech"
IMAGES = ("/images/generations", "/images/edits", "/images/variations")
DEFAULT_IMAGE_SIZE = "1024x1024"


def request_usage(path: str, request: dict[str, Any], response: dict[str, Any] | None) -> Usage:
    """What the request itself says it used, where the answer does not: speech, DALL·E images."""
    route = path.partition("?")[0]
    if route.endswith(SPEECH):
        text = request.get("input")
        return Usage(characters=len(text)) if isinstance(text, str) else NO_USAGE
    if route.endswith(IMAGES):
        data = (response or {}).get("data")
        count = len(data) if isinstance(data, list) else None
        size, quality = request.get("size"), request.get("quality")
        return Usage(
            images=count,
            image_size=size.lower() if isinstance(size, str) and size != "auto" else DEFAULT_IMAGE_SIZE,
            image_quality=quality.lower() if isinstance(quality, str) else "standard",
        )
    return NO_USAGE
