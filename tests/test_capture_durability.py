"""Capture loses nothing a user would miss: kill -9 at saturation, SIGTERM with requests in flight.

Real `run.py proxy` processes in front of the fake upstream, driven by the official openai client.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, ROOT, Keyrotor, port_open, stored_flows, wait_for
from tests.fake_upstream import FakeUpstream

GOOD = ["sk-good-durable-aaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-durable-bbbbbbbbbbbbbbbbbbbbbb0002"]
KILL_BUDGET = 0.25  # seconds: kill -9 may lose the flows completed this long before it, no older ones
MARKER = re.compile(r"durable-(\d+)-")


def stored_markers(kr: Keyrotor) -> set[int]:
    return stored_markers_at(kr.db_path)


def stored_markers_at(path: Path) -> set[int]:
    conn = sqlite3.connect(path, timeout=30)
    try:
        bodies = [row["request_body"] or "" for row in stored_flows(path, conn=conn)]
    finally:
        conn.close()
    return {int(m.group(1)) for body in bodies if (m := MARKER.search(body))}


# A few KB of conversation, as chat clients send: the row's bodies are what the writer indexes.
HISTORY = [
    {"role": "user" if i % 2 else "assistant", "content": f"turn {i}: " + "words of a long chat " * 40}
    for i in range(6)
]


def ask(number: int, history: list[dict] | None = None) -> list[dict]:
    return [*(history or []), {"role": "user", "content": f"durable-{number}- remember me"}]


@pytest.fixture
def upstream_process(keyrotor: Keyrotor) -> Iterator[str]:
    """The fake upstream in a process of its own, so that the load, not the upstream, has this one."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("READY "), line
        keyrotor.upstream_url = line.split()[1]
        yield keyrotor.upstream_url
    finally:
        process.terminate()
        process.wait(10)


class RawLoad:
    """Non-streamed chat completions over plain keep-alive sockets, `concurrency` at a time.

    For saturation only: the openai SDK spends more CPU per request than the proxy does, so
    on two cores it could never keep the proxy busy. Every other test here uses the SDK.
    """

    def __init__(self, kr: Keyrotor, client_key: str, concurrency: int) -> None:
        self.port, self.key, self.concurrency = kr.proxy_port, client_key, concurrency
        self.done: dict[int, float] = {}  # request number: when its answer was read whole
        self.started_at = time.monotonic()
        self._numbers = iter(range(10**9))

    def wire(self, number: int) -> bytes:
        body = json.dumps({"model": "gpt-4o-mini", "messages": ask(number, HISTORY)}).encode()
        return (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {self.key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def worker(self) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            while True:
                number = next(self._numbers)
                writer.write(self.wire(number))
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))
                body = await reader.readexactly(length)
                if head.startswith(b"HTTP/1.1 200") and b'"choices"' in body:
                    self.done[number] = time.monotonic()
        except (OSError, asyncio.IncompleteReadError):
            return  # the proxy is gone

    async def run(self) -> None:
        await asyncio.gather(*(self.worker() for _ in range(self.concurrency)))


class RowWatch:
    """Reads new rows as they are committed: when each request's row became visible."""

    def __init__(self, kr: Keyrotor) -> None:
        self.conn = sqlite3.connect(kr.db_path, timeout=0.05)
        self.seen: dict[int, float] = {}
        self.last_id = 0

    def poll(self) -> None:
        try:
            rows = [(r["id"], r["request_body"]) for r in stored_flows(None, self.last_id, conn=self.conn)]
        except sqlite3.OperationalError:
            return  # busy this instant
        now = time.monotonic()
        for row_id, body in rows:
            self.last_id = row_id
            if match := MARKER.search(body or ""):
                self.seen[int(match.group(1))] = now


@pytest.mark.alone  # how long a row waits to be committed is what a neighbour's CPU use would decide
def test_kill_9_at_saturation_loses_at_most_the_last_quarter_second(keyrotor: Keyrotor, upstream_process: str):
    client_key = keyrotor.start_serving(*GOOD)
    proxy = keyrotor.processes[-1]
    load = RawLoad(keyrotor, client_key, concurrency=64)
    watch = RowWatch(keyrotor)

    async def load_then_kill() -> float:
        running = asyncio.ensure_future(load.run())
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            watch.poll()
        # Killed while as busy as it gets: requests keep coming right up to the kill.
        killed_at = time.monotonic()
        os.kill(proxy.pid, signal.SIGKILL)
        await running
        return killed_at

    killed_at = asyncio.run(load_then_kill())
    assert proxy.wait(10) == -signal.SIGKILL
    # A kill at any moment loses what is completed and not yet committed, so the longest a
    # row took to be committed is the most a kill -9 can lose; the first second is start-up.
    latencies = [watch.seen[n] - at for n, at in load.done.items() if n in watch.seen and at > load.started_at + 1]
    stored = stored_markers(keyrotor)
    old_enough = [n for n, at in load.done.items() if at < killed_at - KILL_BUDGET]
    assert len(old_enough) > 100, "the load never got going"
    lost = [n for n in old_enough if n not in stored]
    assert not lost, f"{len(lost)} of {len(old_enough)} flows completed over 250 ms before kill -9 have no row"
    assert max(latencies) <= KILL_BUDGET, f"a row took {max(latencies) * 1000:.0f} ms to be committed"


class Streams:
    """Streamed chat completions through the official client, all started at once."""

    def __init__(self, kr: Keyrotor, client_key: str) -> None:
        self.client = openai.AsyncOpenAI(base_url=kr.base_url, api_key=client_key, max_retries=0, timeout=30)
        self.first_chunk: set[int] = set()
        self.text: dict[int, str] = {}  # whole streams, by request number
        self.failed: dict[int, Exception] = {}

    async def one(self, number: int) -> None:
        text = ""
        try:
            stream = await self.client.chat.completions.create(model="gpt-4o-mini", messages=ask(number), stream=True)
            async for chunk in stream:
                self.first_chunk.add(number)
                if chunk.choices and chunk.choices[0].finish_reason == "stop":
                    self.text[number] = text
                elif chunk.choices:
                    text += chunk.choices[0].delta.content or ""
        except openai.APIError as e:
            self.failed[number] = e

    async def until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
            await asyncio.sleep(0.02)


def flow_rows(kr: Keyrotor) -> list[sqlite3.Row]:
    conn = sqlite3.connect(kr.db_path, timeout=30)
    try:
        return stored_flows(None, conn=conn)
    finally:
        conn.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_lets_requests_in_flight_finish_and_records_every_one(
    keyrotor: Keyrotor, upstream: FakeUpstream, signum: int
):
    client_key = keyrotor.start_serving(*GOOD)
    proxy = keyrotor.processes[-1]
    upstream.stream_chunks, upstream.stream_delay = 6, 0.25  # each stream takes about 1.5 s
    streams = Streams(keyrotor, client_key)
    keep_alive = httpx.Client(base_url=keyrotor.base_url, headers={"authorization": f"Bearer {client_key}"})
    assert keep_alive.get("/models").status_code == 200  # leaves an idle keep-alive connection open

    async def scenario() -> tuple[bool, httpx.Response]:
        running = [asyncio.ensure_future(streams.one(n)) for n in range(16)]
        await streams.until(lambda: len(streams.first_chunk) == 16, 15, "every stream to start")
        proxy.send_signal(signum)
        await streams.until(lambda: not port_open(keyrotor.proxy_port), 5, "the listener to close")
        closed_while_streaming = len(streams.text) < 16
        # A request on a connection opened before the signal (the proxy cannot tell it from
        # one sent just before): served, and the connection closed after it.
        late = await asyncio.to_thread(keep_alive.get, "/models")
        with pytest.raises(httpx.ConnectError):
            await asyncio.to_thread(keep_alive.get, "/models")
        await asyncio.gather(*running)
        return closed_while_streaming, late

    closed_while_streaming, late = asyncio.run(scenario())
    assert closed_while_streaming, "the listener stayed open until the streams ended"
    assert streams.failed == {}
    assert sorted(streams.text) == list(range(16)) and all(t.startswith("Hello from") for t in streams.text.values())
    assert late.status_code == 200 and late.headers["connection"] == "close"
    assert proxy.wait(20) == 0
    rows = flow_rows(keyrotor)
    streamed = [r for r in rows if r["stream"]]
    assert len(streamed) == 16 and {r["status"] for r in streamed} == {200}
    assert all(r["error"] is None and "[DONE]" in r["response_body"] for r in streamed)
    assert [r["status"] for r in rows if not r["stream"]] == [200, 200]


def test_requests_still_running_when_the_grace_ends_are_cut_and_recorded(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = keyrotor.start_serving(*GOOD, proxy_args=("--set", "proxy.stop_grace_seconds=1"))
    proxy = keyrotor.processes[-1]
    upstream.stream_chunks, upstream.stream_delay = 40, 0.25  # ten seconds: longer than the grace
    streams = Streams(keyrotor, client_key)

    async def scenario() -> float:
        running = asyncio.ensure_future(streams.one(0))
        await streams.until(lambda: streams.first_chunk, 15, "the stream to start")
        signalled = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        await running
        return signalled

    signalled = asyncio.run(scenario())
    assert proxy.wait(20) == 0
    assert time.monotonic() - signalled < 8, "the proxy waited for the stream instead of its grace"
    assert 0 in streams.failed and 0 not in streams.text
    (row,) = flow_rows(keyrotor)
    assert row["status"] == 200 and row["stream"] == 1
    assert "stop_grace_seconds" in row["error"]
    assert row["response_body"].startswith("data: ")  # what reached the client before the cut


# ------------------------------------------------------------------ a database that refuses writes


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MB tmpfs of its own, so that a test can fill it up (or make it read-only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def metrics(kr: Keyrotor) -> dict[str, float]:
    text = httpx.get(f"{kr.ui_url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    values = {}
    for line in text.splitlines():
        if line.startswith("keyrotor_capture_"):
            name, value = line.split()
            values[name] = float(value)
    return values


def dashboard(kr: Keyrotor) -> str:
    return httpx.get(f"{kr.ui_url}/dashboard", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text


def count_rows(path: Path) -> int:
    conn = sqlite3.connect(path, timeout=30)
    try:
        return conn.execute("SELECT count(*) FROM flows").fetchone()[0]
    finally:
        conn.close()


def test_locked_database_keeps_the_rows_shows_it_and_writes_them_later(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = keyrotor.start_serving(*GOOD)
    keyrotor.start_ui()
    client = openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, max_retries=0, timeout=20)
    # Another program's write transaction, held far longer than any busy timeout.
    holder = sqlite3.connect(keyrotor.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for number in range(5):
            assert client.chat.completions.create(model="gpt-4o-mini", messages=ask(number)).choices
        wait_for(
            lambda: metrics(keyrotor).get("keyrotor_capture_waiting") == 5,
            what="/metrics to count 5 flows waiting",
        )
        assert metrics(keyrotor)["keyrotor_capture_failing"] == 1
        page = dashboard(keyrotor)
        assert "Capture cannot write to the database" in page and "database is locked" in page
    finally:
        holder.rollback()
        holder.close()
    wait_for(lambda: count_rows(keyrotor.db_path) == 5, what="the 5 waiting flows to be stored")
    wait_for(lambda: metrics(keyrotor).get("keyrotor_capture_failing") == 0, what="capture to report it writes again")
    assert metrics(keyrotor) == {
        "keyrotor_capture_dropped_total": 0,
        "keyrotor_capture_waiting": 0,
        "keyrotor_capture_failing": 0,
    }
    assert "Capture cannot write" not in dashboard(keyrotor)


def test_full_disk_keeps_rows_up_to_the_backlog_and_counts_what_it_dropped(
    small_disk: Path, keyrotor: Keyrotor, upstream: FakeUpstream
):
    db_path = small_disk / "keyrotor.db"
    keyrotor.env["KEYROTOR_STORAGE_PATH"] = str(db_path)
    client_key = keyrotor.start_serving(*GOOD, proxy_args=("--set", "capture.backlog_mb=1"))
    keyrotor.start_ui()
    client = openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, max_retries=0, timeout=20)
    client.models.list()
    wait_for(lambda: count_rows(db_path) == 1, what="the first row")
    checkpoint = sqlite3.connect(db_path)  # the WAL cut back first: the writer would free its space itself
    checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpoint.close()
    ballast = small_disk / "ballast"
    with ballast.open("wb") as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    # Six prompts of 300 KB: more than the 1 MB the writer may hold, so the oldest go.
    big = "lorem ipsum " * 25_000
    for number in range(6):
        messages = [{"role": "user", "content": f"durable-{number}- {big}"}]
        assert client.chat.completions.create(model="gpt-4o-mini", messages=messages).choices
    wait_for(lambda: metrics(keyrotor).get("keyrotor_capture_failing") == 1, what="/metrics to report failing writes")
    wait_for(lambda: metrics(keyrotor).get("keyrotor_capture_dropped_total", 0) >= 1, what="dropped flows counted")
    page = dashboard(keyrotor)
    assert "database or disk is full" in page and "could not be stored and were dropped" in page
    ballast.unlink()  # space again: what was kept gets written
    wait_for(lambda: metrics(keyrotor).get("keyrotor_capture_failing") == 0, what="capture to write again")

    # Writing again is not having written everything: what waited is written over the next batches.
    def accounted() -> int:
        return len(stored_markers_at(db_path)) + int(metrics(keyrotor)["keyrotor_capture_dropped_total"])

    wait_for(lambda: accounted() >= 6, what="every kept flow written")
    dropped = int(metrics(keyrotor)["keyrotor_capture_dropped_total"])
    stored = stored_markers_at(db_path)
    assert len(stored) + dropped == 6, (stored, dropped)
    # Writes shrink after each failure, so the first flow may get in alone on the last free pages;
    # of the flows that waited, the oldest were dropped: the newest are all kept.
    missing = set(range(6)) - stored
    assert len(missing) == dropped and stored >= set(range(max(missing) + 1, 6)), (stored, dropped)
    assert max(missing) < 5 and len(stored) >= 6 - dropped, "the newest flows are kept, the oldest dropped"
    assert f"{dropped} flows could not be stored and were dropped" in dashboard(keyrotor)


def test_database_and_the_files_beside_it_are_private(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = keyrotor.start_serving(*GOOD)
    openai.OpenAI(base_url=keyrotor.base_url, api_key=client_key, max_retries=0).models.list()
    wait_for(lambda: count_rows(keyrotor.db_path) == 1, what="the row")
    files = sorted(p for p in keyrotor.tmp.iterdir() if p.name.startswith("keyrotor.db"))
    assert {p.name for p in files} >= {"keyrotor.db", "keyrotor.db-wal", "keyrotor.db-shm", "keyrotor.db.capture"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o600" for p in files}


def test_a_read_only_database_stops_start_up_with_one_sentence(small_disk: Path, keyrotor: Keyrotor):
    db_path = small_disk / "keyrotor.db"
    keyrotor.env["KEYROTOR_STORAGE_PATH"] = str(db_path)
    keyrotor.add_keys(GOOD[0])
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for command in (["proxy"], ["serve"], ["ui"], ["keys", "list"]):
        done = keyrotor.cli(*command, "--proxy-port", "1", "--ui-port", "1", check=False)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert done.stderr == f"keyrotor: the database {db_path} cannot be written: it is on a read-only file system.\n"


def test_a_file_that_is_not_a_database_stops_start_up_with_one_sentence(keyrotor: Keyrotor):
    keyrotor.db_path.write_text("not a database, just text\n" * 100)
    done = keyrotor.cli("proxy", check=False)
    assert done.returncode == 2
    assert done.stderr == (
        f"keyrotor: the database {keyrotor.db_path} cannot be written: the file is not a SQLite database.\n"
    )
