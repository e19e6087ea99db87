"""A port keyrotor should listen on is taken: run.py stops at once with keyrotor's own sentence naming
the setting and the flag to change, never mitmproxy's or uvicorn's advice (`--mode …@PORT`, `web_port`)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, Keyrotor, free_port

FOREIGN_ADVICE = ("--mode", "--set web_port", "Traceback", "Errno")


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another program listens on, for the test's duration."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run(keyrotor: Keyrotor, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, *(["-c", script] if script else [str(ROOT / "run.py")]), *args]
    return subprocess.run(command, env=keyrotor.env, cwd=keyrotor.tmp, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("command", "taken_by", "sentence"),
    [
        (("proxy",), "--proxy-port", "set [proxy] port in config.toml, or pass --proxy-port PORT"),
        (("serve",), "--proxy-port", "set [proxy] port in config.toml, or pass --proxy-port PORT"),
        (("ui",), "--ui-port", "set [ui] port in config.toml, or pass --ui-port PORT (or KEYROTOR_UI_PORT=PORT)"),
        (("serve",), "--ui-port", "set [ui] port in config.toml, or pass --ui-port PORT"),
        (("proxy", "--web"), "web", "set [proxy] web_port in config.toml, or pass --set proxy.web_port=PORT"),
        (("serve", "--web"), "web", "set [proxy] web_port in config.toml, or pass --set proxy.web_port=PORT"),
    ],
)
def test_a_taken_port_stops_the_start_with_keyrotors_sentence(
    keyrotor: Keyrotor, taken: int, command: tuple[str, ...], taken_by: str, sentence: str
):
    ports = {"--proxy-port": str(free_port()), "--ui-port": str(free_port())}
    web = str(free_port())
    if taken_by == "web":
        web = str(taken)
    else:
        ports[taken_by] = str(taken)
    args = [*command, *(a for pair in ports.items() for a in pair), "--set", f"proxy.web_port={web}"]
    result = run(keyrotor, *args, "--upstream", keyrotor.upstream_url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"keyrotor: port {taken} is in use" in result.stderr
    assert sentence in result.stderr
    assert not any(advice in result.stdout + result.stderr for advice in FOREIGN_ADVICE)
    assert "listening" not in result.stdout + result.stderr  # nothing started: not the other server either


def test_two_servers_set_to_one_port_stop_the_start(keyrotor: Keyrotor):
    port = str(free_port())
    result = run(keyrotor, "serve", "--proxy-port", port, "--ui-port", port, "--upstream", keyrotor.upstream_url)
    assert result.returncode == 2
    assert f"keyrotor: the proxy and the UI are both set to port {port}: set [ui] port in config.toml" in result.stderr


# The check before the start, skipped: what mitmproxy and uvicorn report themselves when a port is taken
# between keyrotor's check and their own bind comes out as keyrotor's sentence too.
UNCHECKED = "import sys; sys.path.insert(0, {root!r}); from cli import ports; ports.check = lambda *a: None; import run; sys.exit(run.main(sys.argv[1:]))"


@pytest.mark.parametrize(
    ("command", "flag", "sentence"),
    [
        (("proxy",), "--proxy-port", "set [proxy] port in config.toml, or pass --proxy-port PORT"),
        (("ui",), "--ui-port", "set [ui] port in config.toml, or pass --ui-port PORT"),
        (("proxy", "--web"), "web", "set [proxy] web_port in config.toml, or pass --set proxy.web_port=PORT"),
    ],
)
def test_the_servers_own_failure_to_bind_is_reworded(
    keyrotor: Keyrotor, taken: int, command: tuple[str, ...], flag: str, sentence: str
):
    args = [*command, "--upstream", keyrotor.upstream_url]
    if flag == "web":
        args += ["--proxy-port", str(free_port()), "--set", f"proxy.web_port={taken}"]
    else:
        args += [flag, str(taken)]
    result = run(keyrotor, *args, script=UNCHECKED.format(root=str(ROOT)))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"port {taken} is in use" in output and sentence in output
    assert "--mode" not in output and "--set web_port" not in output
