"""Requests per second of `run.py proxy --workers 1` and `--workers 2`, and streams held by each.

    .venv/bin/python bench/workers.py [--requests N] [--concurrency C] [--streams S] [--json out.json]

Against the same fake OpenAI upstream (tests/fake_upstream.py, its own process), for each
worker count in turn: a fresh database with one key and one client, `run.py proxy --workers N`
(full chain: access, key pool, capture to SQLite), then

- throughput: N small non-streamed chat completions at concurrency C (a plain HTTP/1.1
  client, cheap on CPU), each of the C connections kept alive (the kernel's SO_REUSEPORT
  hash places each connection on one worker), requests per second over the measured
  phase and how many each worker served (the flows' `worker` column);
- streams: S streamed completions at once, each 20 chunks 50 ms apart (a second each):
  how many ended whole (every chunk, then [DONE]) and how many failed.

The load generator (this process, asyncio + httpx) runs on the same machine and takes its
share of the cores: the figures are what one machine serves with its client included. The
ratio of the two throughputs is printed; the target of issue 22 is 1.6x on two cores. See
bench/README.md. Exit status 0, or 1 when a process would not start or a stream failed.
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
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FAKE_UPSTREAM = ROOT / "tests" / "fake_upstream.py"
RUN_PY = ROOT / "run.py"
ADMIN_KEY = "bench-admin-key-0000000000000000"
KEY = "sk-bench-workers-aaaaaaaaaaaaaaaaaaaaa0001"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
START_SECONDS = 90.0


class BenchError(Exception):
    pass


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of `pid` and its descendants: the proxy's, however many workers."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return total
    return total + sum(tree_cpu(int(child)) for child in children)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_upstream(tmp: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    log = (tmp / f"upstream{len(list(tmp.glob('upstream*')))}.log").open("w")
    process = subprocess.Popen(
        [PYTHON, str(FAKE_UPSTREAM), "--port", "0", *extra], stdout=subprocess.PIPE, stderr=log, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("READY "):
        raise BenchError(f"the fake upstream did not start: {line!r}")
    return process, line.split(" ", 1)[1]


class Proxy:
    """One keyrotor installation in `tmp` with `workers` proxy workers in front of `upstream`."""

    def __init__(self, tmp: Path, upstream: str, workers: int) -> None:
        self.tmp, self.upstream, self.workers = tmp, upstream, workers
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
        client_key = self.run_py("clients", "add", "bench").strip().splitlines()[-1]
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


async def throughput(port: int, key: str, requests: int, concurrency: int, warmup: int, pid: int) -> dict[str, Any]:
    """`requests` chat completions over `concurrency` kept-alive connections.

    A plain HTTP/1.1 client over asyncio streams, a prebuilt request written and the answer read
    by its Content-Length: a tenth of an HTTP library's CPU per request, so that the load
    generator takes as little as it can of the cores the workers need."""
    body = json.dumps(BODY).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    failures = Counter[str]()
    left = 0

    async def connection() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = head[9:12]
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                if status != b"200":
                    failures[status.decode()] += 1
        except (OSError, asyncio.IncompleteReadError) as e:
            failures[type(e).__name__] += 1
        finally:
            writer.close()

    async def run(count: int) -> None:
        nonlocal left
        left = count
        await asyncio.gather(*(connection() for _ in range(concurrency)))

    await run(warmup)
    failures.clear()
    cpu, proxy_cpu, started = time.process_time(), tree_cpu(pid), time.perf_counter()
    await run(requests)
    elapsed, cpu, proxy_cpu = time.perf_counter() - started, time.process_time() - cpu, tree_cpu(pid) - proxy_cpu
    return {
        "requests": requests,
        "seconds": round(elapsed, 3),
        "rps": round(requests / elapsed, 1),
        "failures": dict(failures),
        "load_generator_cpu_seconds": round(cpu, 2),
        "proxy_cpu_ms_per_request": round(proxy_cpu * 1000 / requests, 3),
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


def measure(workers: int, args: argparse.Namespace, upstream: str, stream_upstream: str) -> dict[str, Any]:
    result: dict[str, Any] = {"workers": workers}
    with tempfile.TemporaryDirectory(prefix=f"kr-bench-workers{workers}-") as tmp:
        proxy = Proxy(Path(tmp), upstream, workers)
        try:
            key = proxy.start()
            assert proxy.process is not None
            measured = throughput(proxy.port, key, args.requests, args.concurrency, args.warmup, proxy.process.pid)
            result["throughput"] = asyncio.run(measured)
        finally:
            proxy.stop()
        result["served_by_worker"] = proxy.served_by()
    with tempfile.TemporaryDirectory(prefix=f"kr-bench-workers{workers}-streams-") as tmp:
        proxy = Proxy(Path(tmp), stream_upstream, workers)
        try:
            key = proxy.start()
            url = f"http://127.0.0.1:{proxy.port}"
            result["streams"] = asyncio.run(streams(url, key, args.streams, args.stream_chunks))
        finally:
            proxy.stop()
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per worker count (3000)")
    parser.add_argument("--concurrency", type=int, default=32, help="connections kept alive at once (32)")
    parser.add_argument("--warmup", type=int, default=200, help="requests before measuring (200)")
    parser.add_argument("--streams", type=int, default=100, help="streams at once (100)")
    parser.add_argument("--stream-chunks", type=int, default=20, help="chunks per stream (20)")
    parser.add_argument("--stream-delay", type=float, default=0.05, help="seconds between chunks (0.05)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure (1 2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="kr-bench-upstreams-") as tmp:
        plain, upstream = start_upstream(Path(tmp))
        streaming, stream_upstream = start_upstream(
            Path(tmp), "--stream-chunks", str(args.stream_chunks), "--stream-delay", str(args.stream_delay)
        )
        try:
            for workers in args.workers:
                results.append(measure(workers, args, upstream, stream_upstream))
                print(json.dumps(results[-1]), flush=True)
        except BenchError as e:
            print(f"bench/workers.py: {e}", file=sys.stderr)
            return 1
        finally:
            for process in (plain, streaming):
                process.send_signal(signal.SIGTERM)
                process.wait(10)
    by_workers = {r["workers"]: r for r in results}
    print(f"\ncpus: {os.cpu_count()}, load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for r in results:
        t, s = r["throughput"], r["streams"]
        print(
            f"--workers {r['workers']}: {t['rps']:8.1f} req/s ({t['requests']} at concurrency {args.concurrency},"
            f" failures {t['failures'] or 0}; load generator {t['load_generator_cpu_seconds']} s CPU;"
            f" proxy {t['proxy_cpu_ms_per_request']} ms CPU per request),"
            f" served by worker {r['served_by_worker']}; streams whole {s['whole']}/{s['streams']}"
            f" failed {s['failed'] or 0}"
        )
    if 1 in by_workers and 2 in by_workers:
        ratio = by_workers[2]["throughput"]["rps"] / by_workers[1]["throughput"]["rps"]
        print(f"ratio --workers 2 / --workers 1: {ratio:.2f}x (target 1.6x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["streams"]["whole"] == r["streams"]["streams"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
