"""Reading upstream keys that people paste: one per line, optionally `NAME<TAB>KEY`.

Comments (#) and blank lines are skipped and a `Bearer ` prefix is removed; a line that
cannot hold a key is reported by its number, never by its content.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

MIN_KEY_LENGTH = 20
MAX_KEY_LENGTH = 512
MAX_NAME_LENGTH = 64


def is_well_formed(value: str) -> bool:
    # Providers differ in prefixes ("sk-", "sk-proj-", Azure's hex), so check only what no real key has.
    return (
        MIN_KEY_LENGTH <= len(value) <= MAX_KEY_LENGTH
        and value.isascii()
        and value.isprintable()
        and not any(c.isspace() for c in value)
    )


def clean_name(name: str | None) -> str | None:
    """A key's name as stored: trimmed, None when empty; ValueError when it cannot be one."""
    name = (name or "").strip()
    if not name:
        return None
    if len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise ValueError(f"a key name is at most {MAX_NAME_LENGTH} printable characters (no tabs or line breaks)")
    return name


@dataclass(frozen=True)
class NewKey:
    value: str
    name: str | None = None


@dataclass
class ParsedLines:
    keys: list[NewKey] = field(default_factory=list)
    malformed: list[int] = field(default_factory=list)  # 1-based line numbers, never the values


def parse_key_lines(lines: Iterable[str], name: str | None = None) -> ParsedLines:
    """One key per line, or NAME<TAB>KEY; `name` goes to keys whose line names none."""
    default_name = clean_name(name)
    parsed = ParsedLines()
    for number, line in enumerate(lines, start=1):
        value = line.strip()
        if not value or value.startswith("#"):
            continue
        key_name = default_name
        if "\t" in value:
            label, _, value = value.partition("\t")
            value = value.strip()
            try:
                key_name = clean_name(label) or default_name
            except ValueError:
                parsed.malformed.append(number)
                continue
        if value.lower().startswith("bearer "):
            value = value[7:].strip()
        if is_well_formed(value):
            parsed.keys.append(NewKey(value, key_name))
        else:
            parsed.malformed.append(number)
    return parsed
