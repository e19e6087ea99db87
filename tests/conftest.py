"""Fixtures that start real servers on free loopback ports: the fake upstream, keyrotor's proxy and UI."""

from __future__ import annotations

import contextvars
import fcntl
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from mitmproxy.test import taddons

from addons.keyrotor import KeyRotor
from addons.runtime import Runtime
from config import load_settings
from storage import db
from tests.fake_upstream import FakeUpstream
from tests.services import PostgresServer, RedisServer, start_postgres, start_redis

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


def batch_input(lines: int, model: str = "gpt-4o-mini") -> bytes:
    """A batch's input file (JSONL): `lines` chat requests for `model`."""
    return b"".join(
        json.dumps(
            {"custom_id": f"req-{n}", "method": "POST", "url": "/v1/chat/completions", "body": {"model": model}}
        ).encode()
        + b"\n"
        for n in range(lines)
    )


def raw_chat_request(client_key: str, model: str) -> bytes:
    """One chat completion request as the bytes an HTTP/1.1 client sends, for tests that hang up mid-way."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}]}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {client_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _checked(result: subprocess.CompletedProcess, args: tuple[str, ...], check: bool) -> subprocess.CompletedProcess:
    if check and result.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


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
        return _checked(result, args, check)

    def setup(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """`run.py ARGS` in this process, for what a test needs in place before it starts.

        The same main() as cli(), without starting an interpreter (0.8 s of CPU each, a few
        hundred times a suite). The command line itself, as users run it, is what cli() and
        tests/test_run_cli.py check in subprocesses.
        """
        import run

        out, err = io.StringIO(), io.StringIO()
        saved_env, saved_stdin = dict(os.environ), sys.stdin
        os.environ.clear()
        os.environ.update(self.env)
        sys.stdin = io.StringIO(input or "")
        try:
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    # A copy of the context: the audit actor the CLI sets stays with this command.
                    code = contextvars.copy_context().run(run.main, list(args))
                except SystemExit as e:  # argparse refusing the arguments
                    code = e.code if isinstance(e.code, int) else 2
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            sys.stdin = saved_stdin
        return _checked(
            subprocess.CompletedProcess(["run.py", *args], code, out.getvalue(), err.getvalue()), args, check
        )

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Rows of `sql` from this installation's database, on a connection of the test's own."""
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def add_keys(self, *keys: str) -> None:
        self.setup("keys", "add", input="\n".join(keys) + "\n")

    def add_client(self, name: str = "alice") -> str:
        return self.setup("clients", "add", name).stdout.strip().splitlines()[-1]

    def start_serving(self, *keys: str, client: str = "alice", proxy_args: tuple[str, ...] = ()) -> str:
        """The usual start of a test: `keys` in the default pool, a client, the proxy running; the client's key."""
        self.add_keys(*keys)
        client_key = self.add_client(client)
        self.start_proxy(*proxy_args)
        return client_key

    def start_with_mitmweb(self, *keys: str) -> tuple[str, int]:
        """start_serving, with mitmweb on a free port as well: the client's key and mitmweb's port."""
        web_port = free_port()
        client_key = self.start_serving(*keys, proxy_args=("--web", "--set", f"proxy.web_port={web_port}"))
        wait_for(lambda: port_open(web_port), START_DEADLINE, what="mitmweb")
        return client_key, web_port

    def add_upstream_serving(self, group: str, url: str, model: str, key: str) -> None:
        """An upstream at `url` whose one group, `group` (UPSTREAM/GROUP), serves `model` with `key`,
        ahead of default/default (priority 10)."""
        self.setup("upstreams", "add", group.partition("/")[0], url)
        self.setup("groups", "add", group, "--priority", "10")
        self.setup("models", "add", group, model)
        self.setup("keys", "add", "--group", group, input=key + "\n")

    def start_proxy(self, *extra: str) -> None:
        self.proxy_port = free_port()
        args = ("proxy", "--proxy-port", str(self.proxy_port), "--upstream", self.upstream_url, *extra)
        self._start_server("proxy", self.proxy_port, self.log_path, *args)

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    def start_ui(self, *extra: str) -> None:
        self.ui_port = free_port()
        self._start_server("UI", self.ui_port, self.tmp / "ui.log", "ui", "--ui-port", str(self.ui_port), *extra)

    def _start_server(self, what: str, port: int, log_path: Path, *args: str) -> None:
        """`run.py ARGS` in the background, its output appended to `log_path`; returns once it listens on `port`."""
        log = log_path.open("ab")
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *args],
            env=self.env,
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        wait_for(lambda: port_open(port) or process.poll() is not None, START_DEADLINE, what=what)
        assert process.poll() is None, log_path.read_text()

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


@pytest.fixture(autouse=True)
def _share_of_the_machine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under pytest-xdist (./test.sh runs a worker per core), a test marked `alone` has the machine to itself.

    Such a test holds a budget that another test's CPU use would decide (how long a row
    takes to be committed at saturation). Every test takes a shared lock, an `alone` one
    the exclusive lock; it holds the turnstile while it waits, so that no new test starts
    beside the running ones meanwhile.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    shared = tmp_path_factory.getbasetemp().parent  # the run's directory, above each worker's
    alone = request.node.get_closest_marker("alone") is not None
    with (shared / "tests.turnstile").open("a") as turnstile, (shared / "tests.lock").open("a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def addon_context(addon, db_path: Path, runtime: Runtime | None = None):
    """mitmproxy's test context for one keyrotor addon, its shared option pointing at `db_path`.

    With `runtime` (the addon's, addons/runtime.py), the database is opened as the proxy opens
    it; its writer and counters run inside the context (its watcher needs the proxy's loop).
    """
    settings = load_settings(overrides={"storage.path": str(db_path)}, environ={})
    with taddons.context(KeyRotor(settings), addon, *([runtime] if runtime else [])) as tctx:
        tctx.configure(addon, keyrotor_storage=str(db_path))
        if runtime is None:
            yield tctx
            return
        runtime.backend.start()
        try:
            yield tctx
        finally:
            runtime.backend.stop()


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, migrated database whose secrets are generated beside it (no KEYROTOR_SECRET)."""
    monkeypatch.delenv("KEYROTOR_SECRET", raising=False)
    path = tmp_path / "kr.db"
    db.ensure_database(path)
    return path


@pytest.fixture
def conn(database: Path) -> Iterator[sqlite3.Connection]:
    """A connection to `database`, closed after the test."""
    connection = db.connect(database)
    yield connection
    connection.close()


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


def stored_flows(path, after_id: int = 0, conn=None) -> list[dict]:
    """Flows as storage's readers get them (headers and bodies unpacked), oldest first."""
    from storage import flows

    own = conn is None
    conn = conn or db.connect(path, readonly=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM flows WHERE id > ? ORDER BY id", (after_id,)).fetchall()
        return [flows.unpack_row(conn, row) for row in rows]
    finally:
        if own:
            conn.close()


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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL cluster per test process (tests/services.py); tests take fresh databases."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a new empty database on the shared cluster, this test's alone."""
    return postgres_server.database()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server of this test's own (it may stop and restart it): ~50 ms to start."""
    server = start_redis()
    try:
        yield server
    finally:
        server.close()
