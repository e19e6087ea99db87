"""Fixtures that start real servers on free loopback ports: the fake upstream, keyrotor's proxy and UI."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from mitmproxy.test import taddons

from addons.keyrotor import KeyRotor
from config import load_settings
from storage import db
from tests.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "kra-test-admin-key-0123456789abcdef"
START_DEADLINE = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = ""):
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def raises(call: Callable[[], object]) -> openai.APIError | None:
    """The API error `call` raised, or None when it succeeded."""
    try:
        call()
    except openai.APIError as e:
        return e
    return None


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Keyrotor:
    """One keyrotor installation in a temp dir: database, CLI, and the servers it started."""

    tmp: Path
    upstream_url: str
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)
    proxy_port: int | None = None
    ui_port: int | None = None

    @property
    def db_path(self) -> Path:
        return self.tmp / "keyrotor.db"

    @property
    def log_path(self) -> Path:
        return self.tmp / "proxy.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}/v1"

    def cli(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.tmp,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"run.py {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Rows of `sql` from this installation's database, on a connection of the test's own."""
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def add_keys(self, *keys: str) -> None:
        self.cli("keys", "add", input="\n".join(keys) + "\n")

    def add_client(self, name: str = "alice") -> str:
        return self.cli("clients", "add", name).stdout.strip().splitlines()[-1]

    def start_proxy(self, *extra: str) -> None:
        self.proxy_port = free_port()
        log = self.log_path.open("ab")
        process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "run.py"),
                "proxy",
                "--proxy-port",
                str(self.proxy_port),
                "--upstream",
                self.upstream_url,
                *extra,
            ],
            env=self.env,
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        wait_for(lambda: port_open(self.proxy_port) or process.poll() is not None, START_DEADLINE, what="proxy")
        assert process.poll() is None, self.log_path.read_text()

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    def start_ui(self, *extra: str) -> None:
        self.ui_port = free_port()
        log = (self.tmp / "ui.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), "ui", "--ui-port", str(self.ui_port), *extra],
            env=self.env,
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        wait_for(lambda: port_open(self.ui_port) or process.poll() is not None, START_DEADLINE, what="UI")
        assert process.poll() is None, (self.tmp / "ui.log").read_text()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def addon_context(addon, db_path: Path):
    """mitmproxy's test context for one keyrotor addon, its shared option pointing at `db_path`."""
    settings = load_settings(overrides={"storage.path": str(db_path)}, environ={})
    with taddons.context(KeyRotor(settings), addon) as tctx:
        tctx.configure(addon, keyrotor_storage=str(db_path))
        yield tctx


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, migrated database whose secrets are generated beside it (no KEYROTOR_SECRET)."""
    monkeypatch.delenv("KEYROTOR_SECRET", raising=False)
    path = tmp_path / "kr.db"
    db.ensure_database(path)
    return path


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(stream_chunks=5).start() as up:
        yield up


@pytest.fixture
def keyrotor(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Keyrotor]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYROTOR_")}
    env.update(
        KEYROTOR_STORAGE_PATH=str(tmp_path / "keyrotor.db"),
        KEYROTOR_ADMIN_KEY=ADMIN_KEY,
        KEYROTOR_CONFIG=str(ROOT / "config.toml"),
        PYTHONUNBUFFERED="1",
    )
    installation = Keyrotor(tmp=tmp_path, upstream_url=upstream.url, env=env)
    yield installation
    installation.stop()


def insert_into_old_schema(conn, records) -> None:
    """Flows (and attempts) into a database migrated only part way: the columns it has, as that version did."""
    from storage import flows

    def insert(table: str, names: tuple[str, ...], rows: list) -> None:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        kept = [i for i, name in enumerate(names) if name in present]
        columns = ", ".join(names[i] for i in kept)
        conn.executemany(
            f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(kept))})",
            [[values[i] for i in kept] for values in rows],
        )

    insert("flows", flows.FLOW_COLUMNS, [flows.column_values(r) for r in records])
    attempt_columns = ("flow_id", "attempt", "upstream_key_id", "status", "error", "started_at", "duration_ms")
    insert(
        "attempts",
        attempt_columns,
        [
            (r.flow_id, a.attempt, a.key_id, a.status, a.error, a.started_at, a.duration_ms)
            for r in records
            for a in r.attempt_log
        ],
    )
