"""The layout's rules, read from the code's own imports (DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from config import ROOT

# core/ is the domain: it must be readable and testable without a proxy, a database or a web app.
CORE_FORBIDDEN = ("mitmproxy", "sqlite3", "sqlite_utils", "fastapi", "starlette", "storage", "addons", "monitor_ui")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", sources("core"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_proxy_sql_or_web(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in CORE_FORBIDDEN}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "path",
    [*sources("core", "storage", "usecases", "monitor_ui", "addons", "cli"), ROOT / "run.py", ROOT / "config.py"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_only_the_script_entry_imports_addons(path):
    if path == ROOT / "addons" / "keyrotor.py":
        return
    if path == ROOT / "cli" / "proxy_master.py":
        # run.py proxy's mitmproxy master loads what `-s addons/keyrotor.py` would, behind addons/chain.py.
        assert {m for m in imported_modules(path) if m.startswith("addons")} <= {"addons", "addons.chain"}
        return
    bad = {m for m in imported_modules(path) if m == "addons" or m.startswith("addons.")}
    if path == PATCHES:
        bad -= {module for module, name in imported_names(path) if name == "install"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: addons talk through flow.metadata"


# The proxy's composition root builds storage's ports and hands them over; the -s entry makes the database.
STORAGE_WIRING = (ROOT / "addons" / "runtime.py", ROOT / "addons" / "keyrotor.py")


@pytest.mark.parametrize("path", sources("addons"), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_composition_root_imports_storage(path):
    if path in STORAGE_WIRING:
        return
    bad = {m for m in imported_modules(path) if m.split(".")[0] == "storage"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: take what it uses from addons/runtime.py"


# addons/patches.py installs the patches of mitmproxy kept beside the addons whose state they share.
PATCHES = ROOT / "addons" / "patches.py"


def imported_names(path: Path) -> set[tuple[str, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        for alias in node.names
    }


def test_the_patches_take_only_install_functions_from_addons():
    taken = {(m, name) for m, name in imported_names(PATCHES) if m == "addons" or m.startswith("addons.")}
    assert taken, "addons/patches.py installs the patches kept in the addons' modules"
    assert {name for _, name in taken} == {"install"}, f"addons/patches.py takes {sorted(taken)}"


@pytest.mark.parametrize("path", sources("storage", "usecases"), ids=lambda p: str(p.relative_to(ROOT)))
def test_storage_and_use_cases_import_no_ui(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("monitor_ui", "fastapi", "mitmproxy")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sources("usecases"), ids=lambda p: str(p.relative_to(ROOT)))
def test_use_cases_work_over_ports_not_storage(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] == "storage"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: take a core.ports Protocol instead"
