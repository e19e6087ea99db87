"""Reading upstream keys that people paste: one per line, optionally `NAME<TAB>KEY`.

Lines of shell and .env files are read as the key they contain: `OPENAI_API_KEY=sk-…`,
`export OPENAI_API_KEY="sk-…"`, `'sk-…'` (the variable's name is not the key's name: it is
usually the same on every line). Comments (#, also after a value) and blank lines are
skipped and a `Bearer ` prefix is removed; a line that cannot hold a key (an unclosed
quote, a value with spaces) is reported by its number, never by its content.
"""

from __future__ import annotations

import re
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
        and not any(c.isspace() or c in "'\"" for c in value)  # a quote is a paste's, never a key's
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
        value = assigned_value(value)
        if value.lower().startswith("bearer "):
            value = value[7:].strip()
        if is_well_formed(value):
            parsed.keys.append(NewKey(value, key_name))
        else:
            parsed.malformed.append(number)
    return parsed


# `export NAME=…`, `NAME=…`: a shell or .env assignment (NAME as shells and .env files spell it).
_ASSIGNMENT = re.compile(r"(export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*=")
_TRAILING_COMMENT = re.compile(r"\s+#.*$")


def assigned_value(text: str) -> str:
    """The value `text` holds: an assignment's right side, unquoted, without a trailing comment.

    What cannot be one value (an unclosed quote, text after the closing quote) comes back empty;
    is_well_formed() refuses that, and spaces or quotes left in a value. A base64 key's
    padding (`abc==`, `QUJD…=`) is no assignment; `OPENAI_API_KEY=` is one, of nothing.
    """
    assignment = _ASSIGNMENT.match(text)
    if assignment:
        rest = text[assignment.end() :].lstrip()
        padding = rest.startswith("=") or (not rest and not assignment[1] and "_" not in assignment[2])
        if not padding:
            text = rest
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        rest = text[end + 1 :].strip() if end > 0 else ""
        if end < 0 or (rest and not rest.startswith("#")):
            return ""  # unclosed, or more than one value: no key
        return text[1:end]
    return _TRAILING_COMMENT.sub("", text)
