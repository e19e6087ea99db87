"""Model prices, from a TOML file the user edits, and the estimated cost of one request.

A table per model: `input` and `output` in US dollars per million tokens. Requests
for models the file does not know are counted in tokens only (cost None).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIELDS = ("input", "output")
PER_TOKENS = 1_000_000


class PriceFileError(ValueError):
    """The prices file is missing, unreadable or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Price:
    input: float  # USD per million prompt tokens
    output: float  # USD per million completion tokens


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
        """Estimated USD of one request; None when the model is unknown or there are no tokens to price."""
        if not isinstance(model, str) or (prompt_tokens is None and completion_tokens is None):
            return None
        price = self.price_of(model)
        if price is None:
            return None
        # Embeddings report no completion tokens: they cost their input only.
        return ((prompt_tokens or 0) * price.input + (completion_tokens or 0) * price.output) / PER_TOKENS


def load_prices(path: str | Path) -> PriceTable:
    path = Path(path)
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise PriceFileError(f"prices file {path} does not exist.") from None
    except OSError as e:
        raise PriceFileError(f"prices file {path} cannot be read: {e.strerror}.") from None
    except tomllib.TOMLDecodeError as e:
        raise PriceFileError(f"prices file {path} is not valid TOML: {e}.") from None
    return PriceTable({model: _price(path, model, entry) for model, entry in document.items()})


def _price(path: Path, model: str, entry: Any) -> Price:
    where = f'prices file {path}: model "{model}"'
    if not isinstance(entry, dict):
        raise PriceFileError(f'{where} must be a table, ["{model}"], with input and output.')
    for name, value in entry.items():
        if isinstance(value, dict):
            # [gpt-4.1] unquoted is the table "1" inside "gpt-4": the easiest mistake to make here.
            raise PriceFileError(f'{where} has a sub-table "{name}"; put names with dots in quotes, like ["gpt-4.1"].')
        if name not in FIELDS:
            raise PriceFileError(f'{where} has an unknown field "{name}" (only input and output).')
    values = []
    for name in FIELDS:
        if name not in entry:
            raise PriceFileError(f'{where} lacks "{name}".')
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            raise PriceFileError(f"{where}: {name} must be dollars per million tokens, zero or more (got {value!r}).")
        values.append(float(value))
    return Price(*values)
