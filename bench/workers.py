"""Requests per second of `run.py proxy --workers 1` and `--workers 2`, and streams held by each.

    .venv/bin/python bench/workers.py [--requests N] [--concurrency C] [--client-rpm R]
                                      [--upstream lean|full] [--streams S] [--json out.json]

Against the same fake OpenAI upstream for both counts (bench/lean_upstream.py, canned answers,
or with --upstream full tests/fake_upstream.py; its own process), for each worker count in
turn: a fresh database with one key and one client (without limits, or an RPM limit),
`run.py proxy --workers N` (full chain: access, key pool, usage, capture to SQLite), then

- throughput: N small non-streamed chat completions over C kept-alive connections (the
  kernel's SO_REUSEPORT hash places each connection on one worker), requests per second
  over the measured phase and how many each worker served (the flows' `worker` column);
- CPU per request of each process role over that phase (workers, supervisor, upstream, load
  generator: user + system of every thread, from /proc), the cores each kept busy, and the
  ratio two saturated cores would give from CPU alone, 2 x W1 / (W2 + L);
- streams: S streamed completions at once, each 20 chunks 50 ms apart (a second each, from
  tests/fake_upstream.py): how many ended whole (every chunk, then [DONE]) and how many failed.

The load generator (this process: one asyncio.Protocol per connection, on uvloop) runs on the
same machine and takes its share of the cores: the figures are what one machine serves with
its client included. The ratio of the two throughputs is printed; the target of issue 22 is
1.6x on two cores. See bench/README.md. Exit status 0, or 1 when a process would not start, a
request failed or a stream failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple, cast

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FAKE_UPSTREAM = ROOT / "tests" / "fake_upstream.py"
LEAN_UPSTREAM = ROOT / "bench" / "lean_upstream.py"
RUN_PY = ROOT / "run.py"
ADMIN_KEY = "bench-admin-key-0000000000000000"
KEY = "sk-bench-workers-aaaaaaaaaaaaaaaaaaaaa0001"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
START_SECONDS = 90.0


class BenchError(Exception):
    pass


CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream(NamedTuple):
    process: subprocess.Popen
    url: str


def start_upstream(tmp: Path, script: Path, *extra: str) -> Upstream:
    log = (tmp / f"upstream{len(list(tmp.glob('upstream*')))}.log").open("w")
    process = subprocess.Popen(
        [PYTHON, str(script), "--port", "0", *extra], stdout=subprocess.PIPE, stderr=log, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("READY "):
        raise BenchError(f"the fake upstream did not start: {line!r}")
    return Upstream(process, line.split(" ", 1)[1])


class Proxy:
    """One keyrotor installation in `tmp` with `workers` proxy workers in front of `upstream`."""

    def __init__(self, tmp: Path, upstream: str, workers: int, client_rpm: int = 0) -> None:
        self.tmp, self.upstream, self.workers, self.client_rpm = tmp, upstream, workers, client_rpm
        self.port = free_port()
        self.db_path = tmp / "kr.db"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KEYROTOR_")}
        self.env.update(
            KEYROTOR_ADMIN_KEY=ADMIN_KEY, KEYROTOR_STORAGE_PATH=str(self.db_path), HOME=str(tmp), PYTHONPATH=str(ROOT)
        )
        self.log_path = tmp / "proxy.log"
        self.process: subprocess.Popen | None = None

    def run_py(self, *args: str, stdin: str = "") -> str:
        done = subprocess.run(
            [PYTHON, str(RUN_PY), *args], input=stdin, capture_output=True, text=True, env=self.env, cwd=self.tmp
        )
        if done.returncode:
            raise BenchError(f"run.py {' '.join(args)}: {done.stderr}")
        return done.stdout

    def start(self) -> str:
        """Starts the proxy; returns the client key."""
        self.run_py("keys", "add", stdin=KEY + "\n")
        limits = ("--rpm", str(self.client_rpm)) if self.client_rpm else ()
        client_key = self.run_py("clients", "add", "bench", *limits).strip().splitlines()[-1]
        self.process = subprocess.Popen(
            [PYTHON, str(RUN_PY), "proxy", "--workers", str(self.workers), "--proxy-port", str(self.port)]
            + ["--upstream", self.upstream, "--set", "capture.bodies=truncated"],
            env=self.env,
            cwd=self.tmp,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_SECONDS
        while self.log_path.read_text(errors="replace").count("listening at") < self.workers:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.workers} workers did not start:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        return client_key

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def served_by(self) -> dict[str, int]:
        conn = sqlite3.connect(self.db_path)
        try:
            rows = conn.execute("SELECT worker, count(*) FROM flows GROUP BY worker").fetchall()
        finally:
            conn.close()
        return {str(worker): count for worker, count in rows}


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread, exited ones included) of the process `pid` alone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_of(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def roles(proxy_pid: int, upstream_pid: int) -> dict[str, list[int]]:
    """The processes whose CPU the throughput phase divides among its requests, by role.

    With one worker `run.py proxy` is the worker itself; with more it is the supervisor and
    its children are the workers. The load generator is this process."""
    workers = children_of(proxy_pid)
    return {
        "workers": workers or [proxy_pid],
        "supervisor": [proxy_pid] if workers else [],
        "upstream": [upstream_pid],
        "load_generator": [os.getpid()],
    }


def cpu_by_role(pids: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(process_cpu(pid) for pid in group) for role, group in pids.items()}


class Client(asyncio.Protocol):
    """One kept-alive connection of the load generator: writes the prebuilt request, frames the
    answer by its Content-Length, counts it, writes the next while requests are left."""

    def __init__(self, shared: Load) -> None:
        self.shared = shared
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.next()

    def next(self) -> None:
        assert self.transport is not None
        if self.shared.left > 0:
            self.shared.left -= 1
            self.transport.write(self.shared.request)
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self.shared.failures["no content-length"] += 1
            assert self.transport is not None
            self.transport.close()
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        if len(self.buffer) < end + 4 + length:
            return
        if head[9:12] != b"200":
            self.shared.failures[head[9:12].decode()] += 1
        self.buffer = self.buffer[end + 4 + length :]
        self.shared.done += 1
        self.next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.shared.left > 0 or self.buffer:
            self.shared.failures[type(exc).__name__ if exc else "closed by the proxy"] += 1
        if not self.lost.done():
            self.lost.set_result(None)


class Load:
    """What the load generator's connections share: the request, how many are left, what failed."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.left = 0
        self.done = 0
        self.failures = Counter[str]()


async def throughput(port: int, key: str, args: argparse.Namespace, pids: dict[str, list[int]]) -> dict[str, Any]:
    """`args.requests` chat completions over `args.concurrency` kept-alive connections.

    A plain HTTP/1.1 client, one asyncio.Protocol per connection (uvloop when installed), a
    prebuilt request written and the answer framed by its Content-Length: a few hundredths of
    a millisecond of CPU per request, so that the load generator takes as little as it can of
    the cores the workers need. Each process's CPU over the measured phase is divided by the
    requests, by role."""
    body = json.dumps(BODY).encode()
    load = Load(
        (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    loop = asyncio.get_running_loop()

    async def run(count: int) -> None:
        load.left = count
        clients = []
        for _ in range(args.concurrency):
            try:
                _, client = await loop.create_connection(lambda: Client(load), "127.0.0.1", port)
            except OSError as e:
                load.failures[type(e).__name__] += 1
                continue
            clients.append(client)
        await asyncio.gather(*(client.lost for client in clients))

    await run(args.warmup)
    load.failures.clear()
    load.done = 0
    before, started = cpu_by_role(pids), time.perf_counter()
    await run(args.requests)
    elapsed = time.perf_counter() - started
    after = cpu_by_role(pids)
    return {
        "requests": args.requests,
        "answered": load.done,
        "seconds": round(elapsed, 3),
        "rps": round(load.done / elapsed, 1),
        "failures": dict(load.failures),
        "cpu_ms_per_request": {
            role: round((after[role] - before[role]) * 1000 / max(1, load.done), 3) for role in pids if pids[role]
        },
        "cpu_cores_busy": {role: round((after[role] - before[role]) / elapsed, 2) for role in pids if pids[role]},
    }


async def streams(url: str, key: str, count: int, chunks: int) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    whole, failed = 0, Counter[str]()
    async with httpx.AsyncClient(base_url=url, limits=limits, headers=headers, timeout=120) as client:

        async def one() -> None:
            nonlocal whole
            content_chunks, done = 0, False
            try:
                async with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as response:
                    if response.status_code != 200:
                        failed[str(response.status_code)] += 1
                        return
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: ") and '"content"' in line:
                            content_chunks += 1
            except httpx.HTTPError as e:
                failed[type(e).__name__] += 1
                return
            if done and content_chunks >= chunks:
                whole += 1
            else:
                failed[f"cut short ({content_chunks} chunks, [DONE]={done})"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        elapsed = time.perf_counter() - started
    return {"streams": count, "whole": whole, "failed": dict(failed), "seconds": round(elapsed, 2)}


def run_async(coroutine: Any) -> Any:
    """The load generator's loop: uvloop when installed (a third of asyncio's CPU per request)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def measure(workers: int, args: argparse.Namespace, upstream: Upstream, stream_upstream: str) -> dict[str, Any]:
    result: dict[str, Any] = {"workers": workers}
    with tempfile.TemporaryDirectory(prefix=f"kr-bench-workers{workers}-") as tmp:
        proxy = Proxy(Path(tmp), upstream.url, workers, args.client_rpm)
        try:
            key = proxy.start()
            assert proxy.process is not None
            pids = roles(proxy.process.pid, upstream.process.pid)
            result["throughput"] = run_async(throughput(proxy.port, key, args, pids))
        finally:
            proxy.stop()
        result["served_by_worker"] = proxy.served_by()
    if args.streams:
        with tempfile.TemporaryDirectory(prefix=f"kr-bench-workers{workers}-streams-") as tmp:
            proxy = Proxy(Path(tmp), stream_upstream, workers)
            try:
                key = proxy.start()
                url = f"http://127.0.0.1:{proxy.port}"
                result["streams"] = asyncio.run(streams(url, key, args.streams, args.stream_chunks))
            finally:
                proxy.stop()
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    by_workers = {r["workers"]: r for r in results}
    print(f"\ncpus: {os.cpu_count()}, load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"upstream: {args.upstream}; {args.requests} requests at concurrency {args.concurrency} after {args.warmup};"
        f" client {'RPM ' + str(args.client_rpm) if args.client_rpm else 'without limits'}"
    )
    for r in results:
        t = r["throughput"]
        cpu = ", ".join(f"{role} {ms:.3f}" for role, ms in t["cpu_ms_per_request"].items())
        busy = ", ".join(f"{role} {cores:.2f}" for role, cores in t["cpu_cores_busy"].items())
        print(
            f"--workers {r['workers']}: {t['rps']:8.1f} req/s, failures {t['failures'] or 0},"
            f" served by worker {r['served_by_worker']}\n"
            f"    CPU ms per request: {cpu}\n    cores busy: {busy}"
        )
        if "streams" in r:
            s = r["streams"]
            print(
                f"    streams ({args.stream_chunks} chunks, {args.stream_delay * 1000:g} ms apart):"
                f" {s['whole']}/{s['streams']} whole, failed {s['failed'] or 0}"
            )
    if 1 in by_workers and 2 in by_workers:
        one, two = by_workers[1]["throughput"], by_workers[2]["throughput"]
        ratio = two["rps"] / one["rps"]
        print(f"ratio --workers 2 / --workers 1: {ratio:.2f}x (target 1.6x)")
        w1 = one["cpu_ms_per_request"]["workers"]
        w2 = two["cpu_ms_per_request"]["workers"] + two["cpu_ms_per_request"].get("supervisor", 0.0)
        rest = sum(ms for role, ms in two["cpu_ms_per_request"].items() if role not in ("workers", "supervisor"))
        print(
            f"  from CPU alone, two saturated cores: 2 x W1 / (W2 + L) = 2 x {w1:.3f} / ({w2:.3f} + {rest:.3f})"
            f" = {2 * w1 / (w2 + rest):.2f}x (W: the proxy's CPU per request, L: the upstream's and load generator's)"
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6000, help="measured requests per worker count (6000)")
    parser.add_argument("--concurrency", type=int, default=256, help="connections kept alive at once (256)")
    parser.add_argument("--warmup", type=int, default=500, help="requests before measuring (500)")
    parser.add_argument(
        "--upstream",
        choices=("lean", "full"),
        default="lean",
        help="lean: bench/lean_upstream.py, canned answers (default); full: tests/fake_upstream.py",
    )
    parser.add_argument(
        "--client-rpm",
        type=int,
        default=0,
        help="give the client this RPM limit (set it above what is sent): every admission is then one"
        " transaction on the shared counters (0: no limit, the default)",
    )
    parser.add_argument("--streams", type=int, default=100, help="streams at once (100; 0: none)")
    parser.add_argument("--stream-chunks", type=int, default=20, help="chunks per stream (20)")
    parser.add_argument("--stream-delay", type=float, default=0.05, help="seconds between chunks (0.05)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure (1 2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="kr-bench-upstreams-") as tmp:
        plain = start_upstream(Path(tmp), LEAN_UPSTREAM if args.upstream == "lean" else FAKE_UPSTREAM)
        streaming = start_upstream(
            Path(tmp),
            FAKE_UPSTREAM,
            "--stream-chunks",
            str(args.stream_chunks),
            "--stream-delay",
            str(args.stream_delay),
        )
        try:
            for workers in args.workers:
                results.append(measure(workers, args, plain, streaming.url))
                print(json.dumps(results[-1]), flush=True)
        except BenchError as e:
            print(f"bench/workers.py: {e}", file=sys.stderr)
            return 1
        finally:
            for upstream in (plain, streaming):
                upstream.process.send_signal(signal.SIGTERM)
                upstream.process.wait(10)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    whole = all(r["streams"]["whole"] == r["streams"]["streams"] for r in results if "streams" in r)
    return 0 if whole and all(not r["throughput"]["failures"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
