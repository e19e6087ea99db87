"""deploy/healthcheck.py, the image's HEALTHCHECK, against a real keyrotor: healthy while the proxy and the UI
answer as keyrotor does, unhealthy (exit 1, one line why) when either is gone or something else holds its
port; and the proxy's check leaves no flow behind (every 15 s on every node, it would fill the flows page).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai

from tests.conftest import ROOT, Keyrotor, wait_for
from tests.fake_upstream import FakeUpstream

SCRIPT = ROOT / "deploy" / "healthcheck.py"
GOOD = ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001"]


def healthcheck(kr: Keyrotor, *parts: str, proxy_port: int | None = None) -> subprocess.CompletedProcess:
    """The check as Docker runs it: `python deploy/healthcheck.py`, with the node's KEYROTOR_* variables."""
    env = {
        **kr.env,
        "KEYROTOR_PROXY_PORT": str(proxy_port or kr.proxy_port),
        "KEYROTOR_UI_PORT": str(kr.ui_port),
        "KEYROTOR_PROXY_HOST": "0.0.0.0",  # as the image sets them: reached on 127.0.0.1
        "KEYROTOR_UI_HOST": "0.0.0.0",
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), *parts], env=env, capture_output=True, text=True, timeout=30, cwd="/"
    )


def test_healthy_while_both_answer_and_the_proxys_check_records_nothing(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = keyrotor.start_serving(*GOOD)
    keyrotor.start_ui()
    for parts in [(), ("proxy",), ("ui",), ("proxy", "ui")]:
        result = healthcheck(keyrotor, *parts)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("healthy: ")
    client = openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    # The request after the checks has its row: had a check made one, it would be there before it.
    rows = wait_for(lambda: keyrotor.query("SELECT path FROM flows"), what="the request's row")
    assert [r["path"] for r in rows] == ["/v1/chat/completions"]
    # The UI's /health the check reads is the one nginx's check and load balancers use.
    assert httpx.get(f"{keyrotor.ui_url}/health").json() == {"status": "ok"}


def test_unhealthy_when_the_proxy_stops_or_something_else_holds_its_port(keyrotor: Keyrotor, upstream: FakeUpstream):
    keyrotor.start_serving(*GOOD)
    keyrotor.start_ui()
    impostor = healthcheck(keyrotor, "proxy", proxy_port=upstream.port)  # an HTTP server, not keyrotor
    assert impostor.returncode == 1
    assert impostor.stderr.startswith(f"unhealthy: the proxy on port {upstream.port} ")
    proxy = keyrotor.processes[0]
    proxy.terminate()
    proxy.wait(30)
    result = healthcheck(keyrotor)
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: the proxy on port") and "does not answer" in result.stderr
    assert healthcheck(keyrotor, "ui").returncode == 0  # the UI alone is still fine
    for process in keyrotor.processes:
        process.terminate()
        process.wait(30)
    assert "the UI on port" in healthcheck(keyrotor, "ui").stderr


def test_the_check_follows_what_run_py_runs(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        from healthcheck import running_command
    finally:
        sys.path.remove(str(ROOT / "deploy"))

    def processes(*cmdlines: tuple[int, list[str]]) -> Path:
        proc = tmp_path / f"proc{len(list(tmp_path.iterdir()))}"
        for pid, args in cmdlines:
            (proc / str(pid)).mkdir(parents=True)
            (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
        return proc

    init = ["/sbin/docker-init", "--", "python", "run.py"]  # compose's `init: true`
    assert running_command(processes((1, [*init, "proxy"]), (7, ["python", "run.py", "proxy"]))) == "proxy"
    assert running_command(processes((1, ["python", "run.py", "ui", "--ui-port", "9000"]))) == "ui"
    assert running_command(processes((1, ["python", "run.py"]))) == "serve"  # the image's CMD, without one
    # serve's own children (the proxy it started) come later: the first process decides.
    assert running_command(processes((1, ["python", "run.py", "serve"]), (9, ["python", "run.py", "proxy"]))) == "serve"
    assert running_command(processes((1, ["python", "run.py", "--config", "/c.toml", "ui"]))) == "ui"
