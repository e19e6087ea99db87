"""deploy/'s files read as Docker Compose, Docker and nginx's image read them, for the tests of their wiring.

Containers cannot run on the machines these tests run on (no Docker engine), so what the container
runtime would do with these files is done here, strictly: compose.yaml's `${VAR}` interpolation, the
nginx image's envsubst of its template, the Dockerfile's instructions. Anything these readers do not
understand fails the test rather than passing unseen.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# Values a user would put into deploy/.env (made up, in the shapes .env.example asks for).
USER_ENV = {
    "KEYROTOR_SECRET": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    "KEYROTOR_ADMIN_KEY": "kra-made-up-for-the-test-0123456789",
    "POSTGRES_PASSWORD": "c0ffee0123456789c0ffee0123456789",
}

# Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ is a "$".
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


class MissingVariable(Exception):
    """A `${VAR:?error}` whose variable is unset or empty: compose refuses to start, with this message."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """`text` as compose interpolates it from `env` (the shell's variables and deploy/.env)."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    result = _INTERPOLATION.sub(replace, text)
    leftover = _INTERPOLATION.sub("", text).replace("$$", "")
    assert "$" not in leftover, f"a $ compose would not read as ${{VAR}}: {text!r}"
    return result


def interpolated(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [interpolated(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolated(v, env) for k, v in value.items()}
    return value


def raw_compose() -> dict[str, Any]:
    """compose.yaml as YAML (its `<<: *anchor` merges resolved), before interpolation."""
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose(env: dict[str, str]) -> dict[str, Any]:
    """compose.yaml as `docker compose` would run it with `env`."""
    return interpolated(raw_compose(), env)


def env_file(path: Path) -> dict[str, str]:
    """A compose .env file: KEY=VALUE lines, comments and blank lines; nothing else."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.partition("=")
        assert equals and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f"{path.name} line {number}: {line!r}"
        values[name] = value
    return values


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, as a mapping (this compose file writes it as one)."""
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment is written as a mapping"
    return {str(k): str(v) for k, v in env.items()}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile() -> list[Instruction]:
    """deploy/Dockerfile's instructions (continuation lines joined, comments dropped)."""
    instructions: list[Instruction] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += " " + stripped.removesuffix("\\").strip() if pending else stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_env() -> dict[str, str]:
    """The ENV the image sets (KEY=VALUE form)."""
    env = {}
    for instruction in dockerfile():
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.args):
                name, equals, value = pair.partition("=")
                assert equals, f"ENV {instruction.args!r}: write ENV NAME=VALUE"
                env[name] = value
    return env


def template_variables(text: str) -> set[str]:
    """The ${NAME}s of the nginx template: what the image's envsubst replaces."""
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))


def render_template(text: str, values: dict[str, str]) -> str:
    """The nginx image's envsubst: each ${NAME} that has a value; nginx's own $variables stay as they are."""
    missing = template_variables(text) - set(values)
    assert not missing, f"the template needs {sorted(missing)}"
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: values[m[1]], text)


def size_bytes(value: str) -> int:
    """An nginx size: 100m, 512k, 1g or bytes."""
    match = re.fullmatch(r"(\d+)([kmgKMG]?)", value)
    assert match, f"not an nginx size: {value!r}"
    return int(match[1]) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match[2].lower()]


def seconds(value: str) -> int:
    """An nginx time: 700s, 10m, 1h or seconds."""
    match = re.fullmatch(r"(\d+)(s|m|h)?", value)
    assert match, f"not an nginx time: {value!r}"
    return int(match[1]) * {None: 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def directives(text: str, name: str) -> list[str]:
    """The arguments of every `name ...;` directive in the nginx config, comments left out."""
    lines = [line.split("#", 1)[0] for line in text.splitlines()]
    return re.findall(rf"(?m)^\s*{re.escape(name)}\s+([^;]*);", "\n".join(lines))
