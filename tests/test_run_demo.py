"""`run.py demo` as a newcomer runs it: one command, a fake upstream, a printed client key, Ctrl-C."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from cli.demo import UPSTREAM_KEYS
from tests.conftest import ADMIN_KEY, ROOT, START_DEADLINE, free_port, port_open, wait_for

READY_LINE = "Ctrl-C stops the demo."


class Demo:
    """A `run.py demo` subprocess in its own process group (a shell job), its output read line by line."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.proxy_port, self.ui_port = free_port(), free_port()
        # The demo's "real" keyrotor: an empty config file, so storage.path is tmp/data/keyrotor.db.
        (tmp / "config.toml").write_text("")
        self.real_database = tmp / "data" / "keyrotor.db"
        self.tmpdir = tmp / "tmp"  # where the demo's throwaway directory goes (TMPDIR)
        self.tmpdir.mkdir()
        env = {
            **os.environ,
            "KEYROTOR_CONFIG": str(tmp / "config.toml"),
            "KEYROTOR_ADMIN_KEY": ADMIN_KEY,
            "TMPDIR": str(self.tmpdir),
        }
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), "demo", "--proxy-port", str(self.proxy_port)]
            + ["--ui-port", str(self.ui_port), *flags],
            env=env,
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.ended = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_line(self, text: str, timeout: float = START_DEADLINE) -> str:
        def seen() -> bool:
            while not self._queue.empty():
                line = self._queue.get()
                if line is None:
                    self.ended = True
                else:
                    self.lines.append(line)
            if any(text in line for line in self.lines):
                return True
            if self.ended:
                raise AssertionError(f"the demo ended without {text!r}:\n" + "".join(self.lines))
            return False

        wait_for(seen, timeout, interval=0.05, what=f"{text!r} in the demo's output")
        return next(line for line in self.lines if text in line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def ctrl_c(self, timeout: float = 30) -> int:
        os.killpg(self.process.pid, signal.SIGINT)  # what Ctrl-C does: every process of the job gets it
        code = self.process.wait(timeout)
        while not self.ended and (line := self._queue.get(timeout=5)) is not None:  # the rest of its output
            self.lines.append(line)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def demo(tmp_path: Path):
    started = Demo(tmp_path)
    yield started
    started.kill()


def test_demo_serves_the_printed_key_shows_flows_and_stops_on_ctrl_c(demo: Demo):
    demo.wait_for_line(READY_LINE)
    client_key = re.search(r"client key\s+(kr-[A-Za-z0-9_-]+)", demo.output).group(1)
    database = Path(re.search(r"database\s+(\S+)", demo.output).group(1))
    assert database.exists() and database.parent.name.startswith("keyrotor-demo-")
    # Fake upstream keys are never printed, only the user's own demo client key.
    assert not any(key.split("\t")[1] in demo.output for key in UPSTREAM_KEYS)

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{demo.proxy_port}/v1", api_key=client_key, max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "one two"}])
    assert reply.choices[0].message.content.startswith("Hello from the fake upstream.")
    assert reply.usage.total_tokens > 0
    streamed = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).startswith("Hello")
    # Only the printed key opens the proxy.
    stranger = openai.OpenAI(base_url=client.base_url, api_key="kr-not-the-demo-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()

    ui = httpx.Client(base_url=f"http://127.0.0.1:{demo.ui_port}", headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def flows() -> list[dict]:
        rows = ui.get("/api/flows", params={"limit": 100}).json()["flows"]
        return rows if len(rows) >= 9 else []  # the demo's 7 requests and ours, once captured

    rows = wait_for(flows, 15, interval=0.2, what="the demo's flows in the UI's API")
    assert {row["status"] for row in rows} >= {200, 404}  # a little traffic, an error among it
    dashboard = ui.get("/api/dashboard").json()  # not empty: the demo's traffic is on it
    assert sum(requests for _, requests, _ in dashboard["per_minute"]) >= 9
    assert dashboard["keys_by_state"].get("active") == 3
    assert demo.ctrl_c() == 0, demo.output
    assert not port_open(demo.proxy_port) and not port_open(demo.ui_port)
    assert not database.parent.exists() and not any(demo.tmpdir.iterdir())  # the throwaway database went too
    assert not demo.real_database.exists()  # and keyrotor's own was never made


def test_demo_refuses_keyrotors_own_database(tmp_path: Path):
    real = tmp_path / "data" / "keyrotor.db"
    demo = Demo(tmp_path, "--storage-path", str(real))
    try:
        assert demo.process.wait(START_DEADLINE) == 2
        assert "a database of its own" in demo.wait_for_line("a database of its own")
    finally:
        demo.kill()
    assert not real.exists()


def test_demo_says_which_flag_frees_a_port_in_use(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        demo = Demo(tmp_path, "--proxy-port", str(port))
        try:
            assert demo.process.wait(START_DEADLINE) == 2
            line = demo.wait_for_line("is in use")
        finally:
            demo.kill()
    assert f"port {port} (proxy.port)" in line and "--proxy-port" in line


def test_ctrl_c_while_the_demo_starts_stops_everything(demo: Demo):
    wait_for(lambda: port_open(demo.proxy_port), START_DEADLINE, what="the demo's proxy")
    assert demo.ctrl_c() == 0, demo.output  # before its traffic and welcome, most likely: either way, clean
    assert not port_open(demo.proxy_port) and not port_open(demo.ui_port)
    assert not any(demo.tmpdir.iterdir())
    assert "Traceback" not in demo.output
