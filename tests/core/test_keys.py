"""Key lines as people paste them or keep them in files: shell and .env assignments, quotes, comments."""

from __future__ import annotations

import pytest

from core.keys import NewKey, parse_key_lines

KEY = "sk-proj-" + "A1b2C3d4" * 5  # 48 characters
PADDED = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY="  # a base64 key with its padding
ROOT = "ZmFrZV9yb290X2tleV9mb3JfdGVzdHM=="

KEPT = object()  # the line is the key as written


@pytest.mark.parametrize(
    ("line", "read"),
    [
        (KEY, KEY),
        (f"  {KEY}  ", KEY),
        (f"OPENAI_API_KEY={KEY}", KEY),
        (f"OPENAI_API_KEY = {KEY}", KEY),
        (f"export OPENAI_API_KEY={KEY}", KEY),
        (f'export OPENAI_API_KEY="{KEY}"', KEY),
        (f"export  OPENAI_API_KEY='{KEY}'", KEY),
        (f'AZURE_OPENAI_API_KEY="{KEY}"  # prod resource', KEY),
        (f"OPENAI_API_KEY={KEY} # a comment after the value", KEY),
        (f"team.a-key={KEY}", KEY),
        (f'"{KEY}"', KEY),
        (f"'{KEY}'", KEY),
        (f"Bearer {KEY}", KEY),
        (f'OPENAI_API_KEY="Bearer {KEY}"', KEY),
        (PADDED, PADDED),  # padding is no assignment
        (ROOT, ROOT),
        (f"KEY={PADDED}", PADDED),
    ],
)
def test_a_line_is_read_as_the_key_it_holds(line: str, read: str):
    parsed = parse_key_lines([line])
    assert parsed.keys == [NewKey(read)] and parsed.malformed == []


@pytest.mark.parametrize(
    "line",
    [
        f'OPENAI_API_KEY="{KEY}',  # unclosed quote
        f"OPENAI_API_KEY='{KEY}\"",  # quotes that do not match
        f'"{KEY}" and more',  # text after the value
        f'"{KEY} {KEY}"',  # two values in one
        "OPENAI_API_KEY=",  # nothing assigned
        "AZURE_OPENAI_API_KEY_FOR_PROD=",  # nothing assigned, though long enough to pass for a key
        'OPENAI_API_KEY=""',
        "export OPENAI_API_KEY",
        f"OPENAI_API_KEY=sk-{'ü' * 30}",
        "OPENAI_API_KEY=sk-short",
    ],
)
def test_a_line_that_holds_no_key_is_refused_by_its_number(line: str):
    parsed = parse_key_lines(["# keys", "", line])
    assert parsed.keys == [] and parsed.malformed == [3]


def test_a_dotenv_file_is_read_key_by_key_and_names_come_from_tabs_or_the_default():
    lines = [
        "# production keys",
        "",
        f"OPENAI_API_KEY={KEY}",
        f'export OTHER_KEY="{KEY[:-4]}wxyz"',
        f"Prod\t'{KEY[:-4]}abcd'",
        "   # indented comment",
        "BROKEN='sk-unclosed",
    ]
    parsed = parse_key_lines(lines, name="imported")
    assert (
        parsed.keys
        == [
            NewKey(KEY, "imported"),  # a variable's name is not the key's
            NewKey(KEY[:-4] + "wxyz", "imported"),
            NewKey(KEY[:-4] + "abcd", "Prod"),
        ]
    )
    assert parsed.malformed == [7]
