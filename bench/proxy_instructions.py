"""Instructions per request: bare mitmdump vs keyrotor's full chain, counted by valgrind.

    .venv/bin/python bench/proxy_instructions.py [--requests 200]

CPU seconds on a shared 2-core VM move by ±10-20 % from run to run (see README.md);
instruction counts do not. Each proxy runs under `valgrind --tool=callgrind` with
instrumentation off; it is switched on (callgrind_control -i on) only around N
sequential non-streamed chat completions, after a warm-up, and the count covers
every thread of the process, keyrotor's capture writer included.

valgrind slows the proxy ~50x, so time-driven work weighs more per request than in
real use: the writer commits after every row or two (at full speed it batches
dozens), and the 0.5 s revision poll lands once every few requests. The ratio here
is therefore an upper bound on keyrotor's overhead at concurrency 1.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_overhead import BenchError, Environment, settle, start_upstream  # noqa: E402

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "benchmark request"}]}


def count_instructions(env: Environment, kind: str, upstream: str, requests: int, warmup: int) -> float:
    """Millions of instructions per request that the proxy `kind` executed."""
    out = env.tmp / f"{kind}.callgrind"
    wrapper = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}")
    target = env.start_proxy(kind, upstream, "instructions", wrapper)
    headers = {"authorization": f"Bearer {target.key}"}
    with httpx.Client(base_url=target.url, headers=headers, timeout=120) as client:
        for _ in range(warmup):
            client.post("/v1/chat/completions", json=BODY).raise_for_status()
        asyncio.run(settle(target.pid))
        subprocess.run(["callgrind_control", "-i", "on", str(target.pid)], check=True, capture_output=True)
        for _ in range(requests):
            client.post("/v1/chat/completions", json=BODY).raise_for_status()
        asyncio.run(settle(target.pid))  # the writer's rows are part of the cost
        subprocess.run(["callgrind_control", "-d", str(target.pid)], check=True, capture_output=True)
    dumps = sorted(env.tmp.glob(f"{kind}.callgrind.*"))
    if not dumps:
        raise BenchError(f"callgrind wrote no dump for {kind}")
    totals = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(), re.M)
    if not totals:
        raise BenchError(f"no totals in {dumps[-1]}")
    for pid_proc in list(env.procs.running):
        if pid_proc[0].pid == target.pid:
            env.procs.stop(pid_proc[0])
    return int(totals.group(1)) / requests / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="measured requests per proxy (default 200)")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured requests first (default 30)")
    args = parser.parse_args(argv)
    args.verbose_proxies = False
    env = Environment(args)
    try:
        env.setup_keyrotor()
        _, upstream = start_upstream(env.procs, "upstream", env.env, [])
        started = time.monotonic()
        counts = {
            kind: count_instructions(env, kind, upstream, args.requests, args.warmup)
            for kind in ("mitmdump", "keyrotor")
        }
        for kind, count in counts.items():
            print(f"{kind:<9} {count:7.3f} M instructions/request")
        print(
            f"ratio     {counts['keyrotor'] / counts['mitmdump']:7.3f}x  (target <= 1.15x; "
            f"{args.requests} sequential requests each, {time.monotonic() - started:.0f} s)"
        )
        return 0
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        env.close()


if __name__ == "__main__":
    sys.exit(main())
