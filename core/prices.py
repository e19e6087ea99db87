"""Model prices, from a TOML file the user edits, and the estimated cost of one request.

A table per model. Token-priced models have `input` and `output` in US dollars per
million tokens, and optionally what OpenAI charges apart: `cached_input`, `audio_input`,
`audio_output`, `image_input`. Other models are priced the way OpenAI prices them:
`per_image` (a table of "SIZE" or "QUALITY SIZE" → dollars per image: DALL·E),
`per_minute` (of audio: Whisper) or `per_million_characters` (of input text: TTS).
Requests for models the file does not know are counted in tokens only (cost None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.metering import Usage
from core.toml_files import read_toml

TOKEN_FIELDS = ("input", "output", "cached_input", "audio_input", "audio_output", "image_input")
UNIT_FIELDS = ("per_minute", "per_million_characters")
PER_IMAGE = "per_image"
FIELDS = (*TOKEN_FIELDS, *UNIT_FIELDS, PER_IMAGE)
PER_TOKENS = 1_000_000


class PriceFileError(ValueError):
    """The prices file is missing, unreadable or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Price:
    input: float | None = None  # USD per million prompt (text) tokens
    output: float | None = None  # USD per million completion tokens (reasoning and image tokens included)
    cached_input: float | None = None  # per million prompt tokens read from cache; None: as input
    audio_input: float | None = None  # per million audio prompt tokens; None: as input
    audio_output: float | None = None  # per million audio completion tokens; None: as output
    image_input: float | None = None  # per million image prompt tokens (image edits); None: as input
    per_minute: float | None = None  # USD per minute of audio (transcription, translation)
    per_million_characters: float | None = None  # USD per million characters of input text (speech)
    per_image: dict[str, float] = field(default_factory=dict)  # "1024x1024" or "hd 1024x1024" → USD

    def tokens_cost(self, usage: Usage) -> float | None:
        if self.input is None or (usage.prompt_tokens is None and usage.completion_tokens is None):
            return None
        prompt, completion = usage.prompt_tokens or 0, usage.completion_tokens or 0
        cost = 0.0
        if self.cached_input is not None and usage.cached_tokens:
            cost += usage.cached_tokens * self.cached_input
            prompt -= usage.cached_tokens
        if self.audio_input is not None and usage.audio_input_tokens:
            # Cached audio was priced as cached above.
            audio = max(0, usage.audio_input_tokens - (usage.cached_audio_tokens or 0))
            cost += audio * self.audio_input
            prompt -= audio
        if self.image_input is not None and usage.image_input_tokens:
            cost += usage.image_input_tokens * self.image_input
            prompt -= usage.image_input_tokens
        if self.audio_output is not None and usage.audio_output_tokens:
            cost += usage.audio_output_tokens * self.audio_output
            completion -= usage.audio_output_tokens
        cost += max(0, prompt) * self.input + max(0, completion) * (self.output or 0)
        return cost / PER_TOKENS

    def units_cost(self, usage: Usage) -> float | None:
        if usage.audio_seconds is not None and self.per_minute is not None:
            return usage.audio_seconds / 60 * self.per_minute
        if usage.characters is not None and self.per_million_characters is not None:
            return usage.characters * self.per_million_characters / PER_TOKENS
        if usage.images is not None and self.per_image:
            size = usage.image_size or ""
            each = self.per_image.get(f"{usage.image_quality} {size}") or self.per_image.get(size)
            return usage.images * each if each is not None else None
        return None


@dataclass(frozen=True)
class PriceTable:
    prices: dict[str, Price] = field(default_factory=dict)  # empty: every model counted in tokens only

    def price_of(self, model: str) -> Price | None:
        """The exact model, else the longest entry it extends by "-" (a dated snapshot of it)."""
        price = self.prices.get(model)
        if price is not None:
            return price
        # "gpt-4o-mini-2024-07-18" is gpt-4o-mini, not gpt-4o; "gpt-4o-mini" itself is never gpt-4o.
        candidates = [name for name in self.prices if model.startswith(name + "-")]
        return self.prices[max(candidates, key=len)] if candidates else None

    def cost(self, model: Any, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """Estimated USD of a request that used these tokens; None when unknown or nothing to price."""
        return self.cost_of(model, Usage(prompt_tokens, completion_tokens))

    def cost_of(self, model: Any, usage: Usage) -> float | None:
        """Estimated USD of one request's usage; None when the model is unknown or nothing can be priced."""
        if not isinstance(model, str):
            return None
        price = self.price_of(model)
        if price is None:
            return None
        # Embeddings report no completion tokens: they cost their input only.
        tokens = price.tokens_cost(usage)
        return tokens if tokens is not None else price.units_cost(usage)


def load_prices(path: str | Path) -> PriceTable:
    path = Path(path)
    document = read_toml(path, "prices file", PriceFileError)
    return PriceTable({model: _price(path, model, entry) for model, entry in document.items()})


def _dollars(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        return None
    return float(value)


def _price(path: Path, model: str, entry: Any) -> Price:
    where = f'prices file {path}: model "{model}"'
    if not isinstance(entry, dict):
        raise PriceFileError(f'{where} must be a table, ["{model}"], with input and output.')
    for name, value in entry.items():
        if isinstance(value, dict) and name != PER_IMAGE:
            # [gpt-4.1] unquoted is the table "1" inside "gpt-4": the easiest mistake to make here.
            raise PriceFileError(f'{where} has a sub-table "{name}"; put names with dots in quotes, like ["gpt-4.1"].')
        if name not in FIELDS:
            raise PriceFileError(f'{where} has an unknown field "{name}" (only {", ".join(FIELDS)}).')
    by_unit = any(name in entry for name in (*UNIT_FIELDS, PER_IMAGE))
    if not by_unit or "input" in entry or "output" in entry:
        for name in ("input", "output"):
            if name not in entry:
                raise PriceFileError(f'{where} lacks "{name}".')
    elif extra := [name for name in TOKEN_FIELDS if name in entry]:
        raise PriceFileError(f'{where} has "{extra[0]}" without input and output.')
    values: dict[str, Any] = {}
    for name in (*TOKEN_FIELDS, *UNIT_FIELDS):
        if name in entry:
            values[name] = _dollars(entry[name])
            if values[name] is None:
                unit = "per million tokens" if name in TOKEN_FIELDS else name.replace("_", " ")
                raise PriceFileError(f"{where}: {name} must be dollars {unit}, zero or more (got {entry[name]!r}).")
    if PER_IMAGE in entry:
        values[PER_IMAGE] = _per_image(where, entry[PER_IMAGE])
    return Price(**values)


def _per_image(where: str, table: Any) -> dict[str, float]:
    if not isinstance(table, dict) or not table:
        raise PriceFileError(f'{where}: per_image must be a table of sizes, like {{ "1024x1024" = 0.04 }}.')
    result = {}
    for size, value in table.items():
        dollars = _dollars(value)
        if dollars is None:
            raise PriceFileError(
                f'{where}: per_image "{size}" must be dollars per image, zero or more (got {value!r}).'
            )
        result[" ".join(size.split()).lower()] = dollars
    return result
