"""The documentation: every relative link and anchor resolves, and every command, flag and setting is in it.

Commands and flags are read from run.py's parser (cli/parser.py's build_parser), settings from
config.py's declarations: adding one without documenting it fails here.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.parser import build_parser
from config import ROOT, SETTINGS

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str) -> Iterator[str]:
    """The lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: letters and digits of any script, and _
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a markdown file: its headings' slugs (repeats get -1, -2, …) and HTML anchors."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text()):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, target) of each link and image outside code."""
    number = 0
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            yield number, match.group(1)


def broken_links(path: Path) -> list[str]:
    """Each relative link of `path` whose file or anchor does not exist, as 'line N: target (why)'."""
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"line {number}: {target} (no such file)")
        elif anchor and linked.is_file() and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"line {number}: {target} (no heading with that anchor)")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path: Path):
    assert broken_links(path) == []


def corpus() -> str:
    return "\n".join(path.read_text() for path in doc_files())


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path of run.py (`("keys", "add")`), leaves and the groups above them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from commands(sub, (*prefix, name))


def flags(parser: argparse.ArgumentParser) -> Iterator[str]:
    """Every long flag of run.py and its commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from flags(sub)
        yield from (option for option in action.option_strings if option.startswith("--") and option != "--help")


def undocumented_commands(text: str) -> list[str]:
    named = re.sub(r"\s+", " ", text)
    return sorted({" ".join(path) for path in commands(build_parser()) if f"run.py {' '.join(path)}" not in named})


def undocumented_flags(text: str) -> list[str]:
    return sorted({flag for flag in flags(build_parser()) if not re.search(rf"(?<![\w-]){flag}(?![\w-])", text)})


def undocumented_settings(text: str) -> list[str]:
    """Settings named nowhere as `section.key` (or `[section] key`, as config.toml reads)."""

    def named(section: str, key: str) -> bool:
        dotted = rf"(?<![\w.]){re.escape(section)}\.{re.escape(key)}(?!\w)"
        tabled = rf"\[{re.escape(section)}\]`?\s+`?{re.escape(key)}(?!\w)"
        return bool(re.search(dotted, text) or re.search(tabled, text))

    return [s.name for s in SETTINGS if not named(s.section, s.key)]


def test_every_run_py_command_is_documented():
    assert undocumented_commands(corpus()) == [], "document them as `run.py COMMAND …` in docs/command-line.md"


def test_every_run_py_flag_is_documented():
    assert undocumented_flags(corpus()) == [], "document them in docs/command-line.md"


def test_every_setting_is_documented():
    assert undocumented_settings(corpus()) == [], "document them as `section.key` in docs/configuration.md"


# The checks themselves: each finds what it is for.


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Clients and limits", "clients-and-limits"),
        ("`run.py keys add`", "runpy-keys-add"),
        ("Refusals, and what each SDK does with them", "refusals-and-what-each-sdk-does-with-them"),
        ("`[proxy]`: where clients connect", "proxy-where-clients-connect"),
        ("Tenancy: objects belong to the client", "tenancy-objects-belong-to-the-client"),
        ("See [the docs](docs/x.md) — now", "see-the-docs--now"),
        ("Schlüssel und Größen", "schlüssel-und-größen"),
        ("snake_case stays", "snake_case-stays"),
    ],
)
def test_slugs_follow_githubs_rules(heading: str, slug: str):
    assert github_slug(heading) == slug


def test_broken_links_and_anchors_are_found(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Part\n\n## Part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine](other.md#part-1) [fine](#page) [web](https://example.com/x#y)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [here](#not-here)\n"
        "`[in code](missing-too.md)`\n\n```\n[in a block](missing-three.md)\n```\n"
    )
    assert broken_links(page) == [
        "line 4: missing.md (no such file)",
        "line 4: other.md#nowhere (no heading with that anchor)",
        "line 4: #not-here (no heading with that anchor)",
    ]


def test_missing_commands_flags_and_settings_are_found():
    documented = corpus()
    assert "storage migrate" in undocumented_commands(documented.replace("run.py storage migrate", "run.py storage"))
    assert "--max-parallel" in undocumented_flags(documented.replace("--max-parallel", "--max parallel"))
    without = re.sub(r"keypool\.wait_max_seconds", "keypool.wait", documented)
    assert undocumented_settings(without) == ["keypool.wait_max_seconds"]
    assert undocumented_settings(without + "\nSet `[keypool] wait_max_seconds` to 0 to never wait.") == []


def test_the_readme_stays_a_five_minute_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200, "move the detail into docs/"


def screenshots_taken() -> set[str]:
    """The file names tests/browser takes with its screenshot() helper (into docs/screenshots/ on request)."""
    tree = ast.parse((ROOT / "tests" / "browser" / "test_ui_browser.py").read_text())
    return {
        node.args[1].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "screenshot"
        and len(node.args) > 1
        and isinstance(node.args[1], ast.Constant)
    }


def test_every_screenshot_in_the_docs_is_one_the_browser_tests_take():
    """So `KEYROTOR_UPDATE_SCREENSHOTS=1 ./test.sh -m browser` refreshes every picture the docs show."""
    shown = {
        Path(target.partition("#")[0]).name
        for path in doc_files()
        for _, target in links(path)
        if "screenshots/" in target
    }
    assert shown, "the README shows the dashboard"
    assert shown <= screenshots_taken()
    tracked = {p.name for p in (ROOT / "docs" / "screenshots").glob("*.png")}
    assert tracked <= screenshots_taken(), "a tracked screenshot no browser test takes would go stale"
