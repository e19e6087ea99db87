"""What capture loses when the proxy is killed (kill -9) or stopped (SIGTERM) at saturation.

    .venv/bin/python bench/capture_durability.py [--checkout before=/tmp/wt-before] [--rounds 3]

Each checkout's `run.py proxy` (default: this one, named "after") runs in front of the
fake OpenAI upstream (tests/fake_upstream.py, its own process) on a fresh database,
and gets two phases per round, the checkouts taking turns:

    kill9    non-streamed chat at concurrency --concurrency for --load-seconds (over
             plain keep-alive sockets: httpx would cost the client more CPU than the
             proxy), then SIGKILL while requests are still coming. Every request
             carries a marker in its prompt; a 200 the client read whole with no row
             holding its marker is lost. Rows are queued in the order flows end, so
             the newest stored row's age at the kill (the window) bounds the lost
             ones' age: the issue's budget is 250 ms.
    sigterm  streamed chat through httpx (--stream-chunks chunks --stream-delay s
             apart) at the same concurrency, then SIGTERM while requests are still
             coming; the load goes on until the proxy has exited. In flight: sent
             before the signal on a connection made before it, and unfinished at
             the signal. Each either completes (a whole stream, [DONE] included) or
             is cut; every request that got an answer should have a row.

During kill9 the load generator also reads the newest row every 50 ms: the lag is how
far its end is behind the clock, the backlog how many completed requests have no row
yet. Exit status 0 when every checkout named "after" met the targets (kill9: the window
within 250 ms whenever rows were lost; sigterm: nothing cut, every answered request has
a row, exit 0), 3 when not, 1 on a failure.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from proxy_overhead import (
    ADMIN_KEY,
    HOST,
    PYTHON,
    ROOT,
    BenchError,
    Processes,
    check_ranges,
    fmt,
    free_port,
    log_tail,
    run_facts,
    start_upstream,
    stop_on_sigterm,
    wait_for_port,
)

from storage import flows

BUDGET_MS = 250.0  # the target: kill -9 loses at most the last 250 ms of completed flows
MARKER = re.compile(rb"bench-req-(\d+)-")
SAMPLE_SECONDS = 0.05
EXIT_TIMEOUT = 40.0  # seconds a proxy may take to exit after SIGTERM before it is killed
UPSTREAM_KEYS = [f"sk-bench-durability-{i:024d}" for i in range(4)]


@dataclass
class Checkout:
    name: str
    root: Path


@dataclass
class Result:
    checkout: str
    phase: str
    round: int
    seconds: float = 0.0  # load before the signal
    sent: int = 0
    completed: int = 0  # 200s read whole before the signal (kill9) / at all (sigterm)
    rps: float = 0.0
    rows: int = 0
    lost: int = 0  # kill9: a 200 the client read whole, no row
    loss_window_ms: float | None = None  # kill9: the newest stored row's age at the kill, when rows were lost
    max_lag_ms: float = 0.0  # kill9: during the load, the most the newest row was behind the clock
    max_backlog: int = 0  # kill9: most completed requests without a row at one sample
    in_flight: int = 0  # sigterm: sent before the signal, unfinished at it
    in_flight_completed: int = 0
    in_flight_cut: int = 0
    answered_without_row: int = 0  # sigterm: any answer (status line read), no row
    refused_after_signal: int = 0  # sigterm: connected (or sent) after the signal, not served
    cut_errors: dict[str, int] = field(default_factory=dict)  # sigterm: how the cut in-flight requests ended
    exit_seconds: float | None = None  # sigterm: signal to process exit
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Request:
    number: int
    sent_at: float
    done_at: float | None = None
    answered: bool = False  # a status line came back
    complete: bool = False  # a 200 read whole
    error: str = ""


class Installation:
    """One checkout's keyrotor in a temp directory: database, keys, client, its proxy."""

    def __init__(self, checkout: Checkout, tmp: Path, procs: Processes, env: dict[str, str]) -> None:
        self.checkout = checkout
        self.dir = tmp / f"{checkout.name}-{time.monotonic_ns()}"
        self.dir.mkdir()
        self.db_path = self.dir / "kr.db"
        self.procs = procs
        self.env = {
            **env,
            "KEYROTOR_STORAGE_PATH": str(self.db_path),
            "KEYROTOR_CONFIG": str(checkout.root / "config.toml"),
        }
        self.client_key = ""

    def run_py(self, *argv: str, stdin: str = "") -> str:
        done = subprocess.run(
            [PYTHON, str(self.checkout.root / "run.py"), *argv],
            cwd=self.dir,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise BenchError(f"{self.checkout.name}: run.py {' '.join(argv)} failed:\n{done.stderr or done.stdout}")
        return done.stdout

    def setup(self) -> None:
        self.run_py("keys", "add", stdin="\n".join(UPSTREAM_KEYS) + "\n")
        self.client_key = self.run_py("clients", "add", "bench").strip().splitlines()[-1].strip()

    def start_proxy(self, upstream: str) -> tuple[subprocess.Popen, str, Path]:
        port = free_port()
        argv = [PYTHON, str(self.checkout.root / "run.py"), "proxy", "--upstream", upstream, "--proxy-port", str(port)]
        proc, log_path = self.procs.start(f"{self.checkout.name}-proxy-{port}", argv, self.env)
        wait_for_port(port, proc, log_path, f"{self.checkout.name} proxy")
        return proc, f"http://{HOST}:{port}/v1/chat/completions", log_path

    def stored_markers(self) -> set[int]:
        conn = sqlite3.connect(self.db_path, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            found = set()
            for row in conn.execute("SELECT * FROM flows"):
                body = flows.unpack_row(conn, row)["request_body"]  # packed since schema v8; older rows as they are
                match = MARKER.search(body.encode() if isinstance(body, str) else body or b"")
                if match:
                    found.add(int(match.group(1)))
            return found
        finally:
            conn.close()

    def newest_row(self, conn: sqlite3.Connection) -> tuple[int, float | None] | None:
        """(rows, when the newest one ended), or None while the database is busy."""
        try:
            row = conn.execute("SELECT id, ended_at FROM flows ORDER BY id DESC LIMIT 1").fetchone()
        except sqlite3.Error:
            return None
        return (row[0], row[1]) if row else (0, None)

    def newest_ended_at(self) -> float:
        conn = sqlite3.connect(self.db_path, timeout=30)
        try:
            return conn.execute("SELECT coalesce(max(ended_at), 0) FROM flows").fetchone()[0]
        finally:
            conn.close()


class RawChat:
    """Non-streamed chat over plain keep-alive sockets: httpx costs the load generator more CPU
    per request than mitmproxy costs the proxy, and on two shared cores the proxy would then
    never be the bottleneck."""

    def __init__(self, url: str, key: str, concurrency: int) -> None:
        parts = httpx.URL(url)
        self.host, self.port, self.path = parts.host, parts.port, parts.raw_path.decode()
        self.key, self.concurrency = key, concurrency
        self.requests: list[Request] = []
        self.stopping = False

    def wire(self, number: int) -> bytes:
        body = json.dumps(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"bench-req-{number}- stay durable"}]}
        ).encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\nauthorization: Bearer {self.key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request) -> None:
        writer.write(self.wire(request.number))
        head = await reader.readuntil(b"\r\n\r\n")
        request.answered = True
        status = int(head.split(b" ", 2)[1])
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        else:  # chunked
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                body += (await reader.readexactly(size + 2))[:size]
                if size == 0:
                    break
        request.complete = status == 200 and b'"choices"' in body
        if not request.complete:
            request.error = f"HTTP {status}"

    async def worker(self) -> None:
        connection = None
        while not self.stopping:
            request = Request(len(self.requests), time.monotonic())
            self.requests.append(request)
            try:
                if connection is None:
                    connection = await asyncio.open_connection(self.host, self.port)
                await asyncio.wait_for(self.exchange(*connection, request), 30)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                request.error = type(e).__name__
                if connection is not None:
                    connection[1].close()
                connection = None
                await asyncio.sleep(0.01)  # the proxy is gone: do not spin
            request.done_at = time.monotonic()
        if connection is not None:
            connection[1].close()

    async def run(self) -> None:
        await asyncio.gather(*(self.worker() for _ in range(self.concurrency)))


class Load:
    """Streamed requests with numbered prompts through httpx, `concurrency` at a time, until stopped."""

    def __init__(self, url: str, key: str, stream: bool, concurrency: int) -> None:
        self.url, self.stream, self.concurrency = url, stream, concurrency
        self.headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        self.requests: list[Request] = []
        self.stopping = False

    def body(self, number: int) -> bytes:
        prompt = f"bench-req-{number}- tell me something durable"
        return json.dumps(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], "stream": self.stream}
        ).encode()

    async def one(self, client: httpx.AsyncClient) -> None:
        request = Request(len(self.requests), time.monotonic())
        self.requests.append(request)
        try:
            async with client.stream("POST", self.url, content=self.body(request.number), headers=self.headers) as r:
                request.answered = True
                if self.stream:
                    tail = b""
                    async for chunk in r.aiter_raw():
                        tail = (tail + chunk)[-64:]
                    request.complete = r.status_code == 200 and b"[DONE]" in tail
                else:
                    request.complete = r.status_code == 200 and b'"choices"' in await r.aread()
                if not request.complete:
                    request.error = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            request.error = type(e).__name__
        request.done_at = time.monotonic()

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0)) as client:

            async def worker() -> None:
                while not self.stopping:
                    await self.one(client)
                    if self.requests[-1].error and not self.requests[-1].answered:
                        await asyncio.sleep(0.01)  # connection refused: the proxy is gone

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))


async def kill9(inst: Installation, upstream: str, args: argparse.Namespace, result: Result) -> None:
    proc, url, _ = inst.start_proxy(upstream)
    load = RawChat(url, inst.client_key, args.concurrency)
    task = asyncio.create_task(load.run())
    conn = sqlite3.connect(inst.db_path, timeout=0.05)
    started = time.monotonic()
    try:
        while time.monotonic() - started < args.load_seconds:
            await asyncio.sleep(SAMPLE_SECONDS)
            newest = inst.newest_row(conn)
            if newest is None:
                continue
            rows, ended_at = newest
            if time.monotonic() - started > 1.0 and ended_at:  # past the start-up, where the lag means nothing
                result.max_lag_ms = max(result.max_lag_ms, round((time.time() - ended_at) * 1000, 1))
            result.max_backlog = max(result.max_backlog, sum(1 for r in load.requests if r.complete) - rows)
        killed_at, killed_wall = time.monotonic(), time.time()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        conn.close()
    proc.wait(10)
    load.stopping = True
    await task
    inst.procs.stop(proc)
    stored = inst.stored_markers()
    # The proxy sent these whole before it died, though the client may have read the last
    # of them after the kill: a client that is itself short of CPU reads late.
    completed = [r for r in load.requests if r.complete]
    lost = [r for r in completed if r.number not in stored]
    result.seconds = killed_at - started
    result.sent = len(load.requests)
    result.completed = len(completed)
    result.rps = sum(1 for r in completed if r.done_at < killed_at) / result.seconds
    result.rows = len(stored)
    result.lost = len(lost)
    if lost:
        # Rows are queued in the order flows end, so every lost one ended after the newest
        # stored one: the newest stored row's age at the kill bounds the lost rows' age.
        result.loss_window_ms = round((killed_wall - inst.newest_ended_at()) * 1000, 1)


async def sigterm(inst: Installation, upstream: str, args: argparse.Namespace, result: Result) -> None:
    proc, url, log_path = inst.start_proxy(upstream)
    load = Load(url, inst.client_key, stream=True, concurrency=args.concurrency)
    task = asyncio.create_task(load.run())
    started = time.monotonic()
    await asyncio.sleep(args.load_seconds)
    signalled_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    deadline = signalled_at + EXIT_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    result.exit_seconds = round(time.monotonic() - signalled_at, 2) if proc.poll() is not None else None
    if proc.poll() is None:
        result.notes.append(f"did not exit within {EXIT_TIMEOUT:.0f} s of SIGTERM; killed")
        proc.kill()
        proc.wait(10)
    result.exit_code = proc.returncode
    load.stopping = True
    await task
    inst.procs.stop(proc)
    stored = inst.stored_markers()
    before = [r for r in load.requests if r.sent_at < signalled_at]
    # A ConnectError means the connection was attempted once the listener had closed: the
    # client, short of CPU itself, got round to connecting after the signal. Not in flight.
    in_flight = [r for r in before if (r.done_at is None or r.done_at >= signalled_at) and r.error != "ConnectError"]
    result.seconds = signalled_at - started
    result.sent = len(load.requests)
    result.completed = sum(1 for r in load.requests if r.complete)
    result.rps = sum(1 for r in before if r.complete and r.done_at < signalled_at) / result.seconds
    result.rows = len(stored)
    result.in_flight = len(in_flight)
    result.in_flight_completed = sum(1 for r in in_flight if r.complete)
    result.in_flight_cut = result.in_flight - result.in_flight_completed
    for r in in_flight:
        if not r.complete:
            result.cut_errors[r.error or "incomplete"] = result.cut_errors.get(r.error or "incomplete", 0) + 1
    result.answered_without_row = sum(1 for r in load.requests if r.answered and r.number not in stored)
    result.refused_after_signal = sum(
        1 for r in load.requests if not r.complete and (r.sent_at >= signalled_at or r.error == "ConnectError")
    )
    if result.exit_code not in (0, -signal.SIGTERM):
        result.notes.append(f"exit status {result.exit_code}: {log_tail(log_path, 5)}")


PHASES = {"kill9": kill9, "sigterm": sigterm}


def report(results: list[Result]) -> str:
    lines = [
        "kill -9 during non-streamed chat (lost: a 200 the client read whole, no row; window: the newest"
        f" stored row's age at the kill, which bounds the lost rows' age; budget {BUDGET_MS:.0f} ms)",
        f"{'checkout':<10} {'round':>5} {'req/s':>7} {'completed':>9} {'lost':>5} {'window ms':>9}"
        f" {'max lag ms':>10} {'max backlog':>11}",
    ]
    for r in (r for r in results if r.phase == "kill9"):
        lines.append(
            f"{r.checkout:<10} {r.round:>5} {r.rps:>7.1f} {r.completed:>9} {r.lost:>5} {fmt(r.loss_window_ms, 1):>9}"
            f" {r.max_lag_ms:>10.1f} {r.max_backlog:>11}"
        )
    lines += [
        "",
        "SIGTERM during streamed chat (in flight: sent before the signal on a connection made before it,"
        " unfinished at the signal)",
        f"{'checkout':<10} {'round':>5} {'req/s':>7} {'in flight':>9} {'completed':>9} {'cut':>4}"
        f" {'answered, no row':>16} {'refused after':>13} {'exit s':>6}",
    ]
    for r in (r for r in results if r.phase == "sigterm"):
        lines.append(
            f"{r.checkout:<10} {r.round:>5} {r.rps:>7.1f} {r.in_flight:>9} {r.in_flight_completed:>9}"
            f" {r.in_flight_cut:>4} {r.answered_without_row:>16} {r.refused_after_signal:>13}"
            f" {fmt(r.exit_seconds, 2):>6}"
        )
    for r in results:
        for note in r.notes:
            lines.append(f"note: {r.checkout} {r.phase} round {r.round}: {note}")
    return "\n".join(lines)


def met_targets(r: Result) -> bool:
    if r.phase == "kill9":
        return r.loss_window_ms is None or r.loss_window_ms <= BUDGET_MS
    return r.in_flight_cut == 0 and r.answered_without_row == 0 and r.exit_code in (0, -signal.SIGTERM)


def parse_checkout(text: str) -> Checkout:
    name, sep, path = text.partition("=")
    root = Path(path if sep else text).expanduser().resolve()
    if not (root / "run.py").exists():
        raise argparse.ArgumentTypeError(f"{root} has no run.py")
    return Checkout(name if sep else root.name, root)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkout",
        action="append",
        type=parse_checkout,
        metavar="NAME=PATH",
        help="a keyrotor checkout to measure (repeatable); this one, as 'after', is always included",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--load-seconds", type=float, default=4.0, help="load before the signal")
    parser.add_argument("--stream-chunks", type=int, default=10)
    parser.add_argument("--stream-delay", type=float, default=0.05, help="seconds between streamed chunks")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure here")
    args = parser.parse_args(argv)
    check_ranges(parser, args, ("rounds", "concurrency", "load_seconds", "stream_chunks"), ("stream_delay",))
    checkouts = args.checkout or []
    if not any(c.root == ROOT for c in checkouts):
        checkouts.append(Checkout("after", ROOT))
    args.checkouts = checkouts
    return args


async def run_all(args: argparse.Namespace, procs: Processes, tmp: Path, env: dict[str, str]) -> list[Result]:
    _, chat_upstream = start_upstream(procs, "upstream-chat", env, [])
    streaming = ["--stream-chunks", str(args.stream_chunks), "--stream-delay", str(args.stream_delay)]
    _, stream_upstream = start_upstream(procs, "upstream-stream", env, streaming)
    upstreams = {"kill9": chat_upstream, "sigterm": stream_upstream}
    results = []
    for number in range(1, args.rounds + 1):
        for phase in args.phases:
            for checkout in args.checkouts:
                inst = Installation(checkout, tmp, procs, env)
                inst.setup()
                result = Result(checkout.name, phase, number)
                await PHASES[phase](inst, upstreams[phase], args, result)
                results.append(result)
                figures = {k: v for k, v in asdict(result).items() if k not in ("checkout", "phase", "round")}
                print(f"  {checkout.name} {phase} round {number}: {figures}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="keyrotor-durability-"))
    procs = Processes(tmp)
    base = {k: v for k, v in os.environ.items() if not k.startswith("KEYROTOR_")}
    home = tmp / "home"
    (home / ".mitmproxy").mkdir(parents=True)
    (home / ".mitmproxy" / "config.yaml").write_text("flow_detail: 0\ntermlog_verbosity: error\n")
    env = {**base, "KEYROTOR_ADMIN_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1", "HOME": str(home)}
    try:
        results = asyncio.run(run_all(args, procs, tmp, env))
    except BenchError as e:
        print(f"capture_durability: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(report(results))
    if args.json:
        document = {**run_facts(started, args, leave_out=("checkout", "checkouts", "json")), "results": []}
        document["checkouts"] = {c.name: str(c.root) for c in args.checkouts}
        document["results"] = [asdict(r) for r in results]
        args.json.write_text(json.dumps(document, indent=2))
    mine = [r for r in results if r.checkout == "after"]
    return 0 if all(met_targets(r) for r in mine) else 3


if __name__ == "__main__":
    sys.exit(main())
