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

import openai
import pytest

from tests.conftest import ROOT, Keyrotor

GOOD = ["sk-good-durable-aaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-durable-bbbbbbbbbbbbbbbbbbbbbb0002"]
KILL_BUDGET = 0.25  # seconds: kill -9 may lose the flows completed this long before it, no older ones
MARKER = re.compile(r"durable-(\d+)-")


def stored_markers(kr: Keyrotor) -> set[int]:
    conn = sqlite3.connect(kr.db_path, timeout=30)
    try:
        bodies = [row[0] or "" for row in conn.execute("SELECT request_body FROM flows")]
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


class Load:
    """Chat completions `concurrency` at a time until stopped (or the proxy is gone)."""

    def __init__(self, kr: Keyrotor, client_key: str, concurrency: int, stream: bool = False) -> None:
        self.client = openai.AsyncOpenAI(base_url=kr.base_url, api_key=client_key, max_retries=0, timeout=30)
        self.concurrency, self.stream = concurrency, stream
        self.sent: dict[int, float] = {}  # request number: when it was sent
        self.done: dict[int, float] = {}  # when its answer was read whole
        self.failed: dict[int, str] = {}
        self.stopping = False

    async def one(self, number: int) -> None:
        self.sent[number] = time.monotonic()
        try:
            if self.stream:
                stream = await self.client.chat.completions.create(
                    model="gpt-4o-mini", messages=ask(number), stream=True
                )
                chunks = [chunk async for chunk in stream]
                assert chunks and chunks[-1].choices[0].finish_reason == "stop"
            else:
                await self.client.chat.completions.create(model="gpt-4o-mini", messages=ask(number))
        except (openai.APIError, AssertionError) as e:
            self.failed[number] = type(e).__name__
            return
        self.done[number] = time.monotonic()

    async def run(self) -> None:
        numbers = iter(range(10**9))

        async def worker() -> None:
            while not self.stopping:
                number = next(numbers)
                await self.one(number)
                if number in self.failed:
                    return  # the proxy is going or gone

        async with self.client:
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))


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
            rows = self.conn.execute("SELECT id, request_body FROM flows WHERE id > ? ORDER BY id", (self.last_id,))
            rows = rows.fetchall()
        except sqlite3.OperationalError:
            return  # busy this instant
        now = time.monotonic()
        for row_id, body in rows:
            self.last_id = row_id
            if match := MARKER.search(body or ""):
                self.seen[int(match.group(1))] = now


def test_kill_9_at_saturation_loses_at_most_the_last_quarter_second(keyrotor: Keyrotor, upstream_process: str):
    keyrotor.add_keys(*GOOD)
    client_key = keyrotor.add_client()
    keyrotor.start_proxy()
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
