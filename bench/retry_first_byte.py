"""When a retried stream's first token reaches the client, against when upstream sent it.

    .venv/bin/python bench/retry_first_byte.py [--tree DIR] [--requests 20] [--chunks 5] [--delay 0.3]

A proxy runs `run.py proxy` from checkout DIR (default: this one), with its own interpreter path
(PYTHONPATH=DIR), in front of the fake upstream (tests/fake_upstream.py, in this process, which
notes the time it hands each event of a stream to its server). Its pool has a key the upstream
always answers with 500 (prefix sk-flaky) and a good one; round robin offers the bad key first
every time, so each request fails once and its stream is the retry's (the circuit breaker is set
out of reach). Each streamed request's first content event is timed at the client (an httpx
stream, read as it arrives) and compared with the time upstream sent it.

Figures (p50, p95, max): the delay from upstream sending the stream's first event to the client
receiving its first byte, and from upstream sending the first content event (the first text) to
the client receiving it; for reference, the stream's length upstream (first to last event sent).
Compare two checkouts in the same session, e.g. `git worktree add --detach /tmp/before main`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_upstream import FakeUpstream  # noqa: E402

ADMIN_KEY = "bench-admin-key-0123456789abcdef"
BAD_KEY = "sk-flaky-retry-first-byte-bad-00000000"
GOOD_KEY = "sk-bench-retry-first-byte-good-0000000"
START_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_py(tree: Path, env: dict[str, str], *argv: str, stdin: str = "") -> str:
    done = subprocess.run(
        [sys.executable, str(tree / "run.py"), *argv],
        cwd=tree,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=START_SECONDS,
    )
    if done.returncode != 0:
        raise SystemExit(f"run.py {' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def arrivals(client: httpx.Client, key: str) -> tuple[float, float]:
    """When the client received the stream's first byte, and its first content event (text not empty)."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "stream": True}
    first = arrived = None
    buffer = b""
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {r.read()[:200]!r}")
        for data in r.iter_raw():
            first = first or time.time()
            buffer += data
            if arrived is None and b'"content": "' in buffer.replace(b'"content": ""', b""):
                arrived = time.time()
    if first is None or arrived is None or not buffer.rstrip().endswith(b"data: [DONE]"):
        raise SystemExit(f"the stream did not arrive whole: {buffer[-200:]!r}")
    return first, arrived


def measure(tree: Path, requests: int, chunks: int, delay: float, retried: bool = True) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="keyrotor-retry-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYROTOR_")}
    env.update(
        KEYROTOR_ADMIN_KEY=ADMIN_KEY,
        KEYROTOR_STORAGE_PATH=str(tmp / "kr.db"),
        KEYROTOR_KEYPOOL_FAILURE_THRESHOLD="1000000000",
        KEYROTOR_KEYPOOL_STRATEGY="round_robin",
        HOME=str(tmp),
        PYTHONPATH=str(tree),
    )
    upstream = FakeUpstream(stream_chunks=chunks, stream_delay=delay).start()
    proxy = None
    try:
        keys = [BAD_KEY, GOOD_KEY] if retried else [GOOD_KEY]
        run_py(tree, env, "keys", "add", stdin="".join(k + "\n" for k in keys))
        client_key = run_py(tree, env, "clients", "add", "bench").strip().splitlines()[-1].strip()
        port = free_port()
        log = (tmp / "proxy.log").open("wb")
        argv = [sys.executable, str(tree / "run.py"), "proxy", "--upstream", upstream.url, "--proxy-port", str(port)]
        proxy = subprocess.Popen(argv, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_SECONDS
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if proxy.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the proxy did not start:\n" + (tmp / "proxy.log").read_text()[-2000:])
            time.sleep(0.1)
        firsts, delays, lengths = [], [], []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(requests):
                before = len(upstream.stream_times)
                first, arrived = arrivals(client, client_key)
                sent = upstream.stream_times[before]  # this request's stream: the retry's
                firsts.append((first - sent[0]) * 1000)  # event 0 is the role: the stream's first byte
                delays.append((arrived - sent[1]) * 1000)  # event 1 the first text
                lengths.append((sent[-1] - sent[0]) * 1000)
        attempts = [r.key for r in upstream.received if r.path == "/v1/chat/completions"]
        if attempts != keys * requests:
            raise SystemExit(f"not every request was retried once: {attempts[:6]} …")
    except httpx.HTTPError as e:
        raise SystemExit(f"{e!r}; the proxy's log ends:\n" + (tmp / "proxy.log").read_text()[-3000:]) from None
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        **{f"first_byte_{name}": value for name, value in spread(firsts).items()},
        **{f"first_text_{name}": value for name, value in spread(delays).items()},
        "stream_ms": statistics.median(lengths),
    }


def spread(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50_ms": statistics.median(values),
        "p95_ms": values[min(len(values) - 1, round(0.95 * (len(values) - 1)))],
        "max_ms": values[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose run.py proxy is measured")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=5, help="content events per stream")
    parser.add_argument("--delay", type=float, default=0.3, help="seconds before each content event")
    parser.add_argument("--json", type=Path, help="also write the figures there")
    parser.add_argument("--first-attempt", action="store_true", help="no bad key: first attempts, for comparison")
    args = parser.parse_args(argv)
    figures = measure(args.tree.resolve(), args.requests, args.chunks, args.delay, not args.first_attempt)
    what = "a first attempt's stream" if args.first_attempt else "a retried stream"
    print(f"{args.tree}: {what}, from upstream sending to the client receiving ({args.requests} requests;")
    print(f"  the stream lasts {figures['stream_ms']:.0f} ms upstream)")
    for what, name in (("first byte", "first_byte"), ("first text", "first_text")):
        print(
            f"  {what:<11} p50 {figures[name + '_p50_ms']:8.1f} ms   p95 {figures[name + '_p95_ms']:8.1f} ms"
            f"   max {figures[name + '_max_ms']:8.1f} ms"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
