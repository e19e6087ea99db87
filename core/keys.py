"""Reading upstream key values that people paste: one per line, comments and Bearer prefixes allowed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

MIN_KEY_LENGTH = 20
MAX_KEY_LENGTH = 512


def is_well_formed(value: str) -> bool:
    # Providers differ in prefixes ("sk-", "sk-proj-", Azure's hex), so check only what no real key has.
    return (
        MIN_KEY_LENGTH <= len(value) <= MAX_KEY_LENGTH
        and value.isascii()
        and value.isprintable()
        and not any(c.isspace() for c in value)
    )


@dataclass
class ParsedLines:
    values: list[str] = field(default_factory=list)
    malformed: list[int] = field(default_factory=list)  # 1-based line numbers, never the values


def parse_key_lines(lines: Iterable[str]) -> ParsedLines:
    """One key per line; blank lines and #-comments are skipped, a `Bearer ` prefix removed."""
    parsed = ParsedLines()
    for number, line in enumerate(lines, start=1):
        value = line.strip()
        if not value or value.startswith("#"):
            continue
        if value.lower().startswith("bearer "):
            value = value[7:].strip()
        if is_well_formed(value):
            parsed.values.append(value)
        else:
            parsed.malformed.append(number)
    return parsed
