"""CPU per request of keyrotor's full chain on SQLite, on PostgreSQL (storage.url) and on PostgreSQL
with Redis (storage.url and redis.url), in the same run.

    .venv/bin/python bench/storage_cpu.py [--requests 2000] [--concurrency 16] [--rounds 2]
                                          [--client-rpm N] [--backends sqlite,postgresql,postgresql+redis]

One fake upstream; a PostgreSQL 15 cluster and a redis-server of the bench's own
(tests/services.py, Debian's binaries, fsync off and no persistence like the tests') on free
loopback ports. Each round runs `run.py proxy` on a fresh SQLite database, then on a fresh
PostgreSQL database, then on another with Redis (a flushed one), with the same keys and
client (`--client-rpm N`: with an RPM limit, so every request is admitted through the shared
counters), and drives N non-streamed chat completions at concurrency C through it. Counted:
the proxy process's CPU (every thread: the event loop, the capture writer, the counters, the
Redis keeper) and the servers' (PostgreSQL's postmaster and its children; redis-server), per
request, after the proxy has gone idle, so each flow's write is in. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy_overhead import (  # noqa: E402
    UPSTREAM_KEYS,
    BenchError,
    Environment,
    cpu_seconds,
    measure,
    settle,
    start_upstream,
)

from tests.services import PostgresServer, RedisServer, start_postgres, start_redis  # noqa: E402

BACKENDS = ("sqlite", "postgresql", "postgresql+redis")


def server_pids(server: PostgresServer) -> list[int]:
    """The postmaster and its children (backends, checkpointer, WAL writer, autovacuum)."""
    postmaster = int((server.datadir / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    return [postmaster, *map(int, children)]


def server_cpu(server: PostgresServer) -> float:
    total = 0.0
    for pid in server_pids(server):
        try:
            total += cpu_seconds(pid)
        except FileNotFoundError:  # a backend that ended meanwhile
            pass
    return total


def redis_cpu(redis: RedisServer) -> float:
    assert redis.process is not None
    return cpu_seconds(redis.process.pid)


async def one_round(
    backend: str,
    server: PostgresServer,
    redis: RedisServer,
    upstream: str,
    upstream_pid: int,
    args: argparse.Namespace,
):
    env = Environment(argparse.Namespace(verbose_proxies=False))
    try:
        if backend.startswith("postgresql"):
            env.env["KEYROTOR_STORAGE_URL"] = env.proxy_env["KEYROTOR_STORAGE_URL"] = server.database("bench")
        if backend.endswith("+redis"):
            redis.restart()  # empty: the proxy seeds it from its new database, as a first node does
            env.env["KEYROTOR_REDIS_URL"] = env.proxy_env["KEYROTOR_REDIS_URL"] = redis.url
        keys = [f"sk-bench-storage-cpu-{n:02d}-aaaaaaaaaaaaaaaaaaaa" for n in range(UPSTREAM_KEYS)]
        env.run_py("keys", "add", stdin="\n".join(keys) + "\n")
        limits = ["--rpm", str(args.client_rpm)] if args.client_rpm else []
        env.client_key = env.run_py("clients", "add", "bench", *limits).strip().splitlines()[-1].strip()
        target = env.start_proxy("keyrotor", upstream, backend)
        before, redis_before = server_cpu(server), redis_cpu(redis)
        phase = await measure(target, upstream_pid, "chat", args.concurrency, args.requests, args)
        await settle(target.pid)
        after, redis_after = server_cpu(server), redis_cpu(redis)
        figures: dict[str, Any] = {
            "backend": backend,
            "ok": phase.ok,
            "requests": phase.requests,
            "errors": phase.errors,
            "rps": phase.rps,
            "p50_ms": phase.p50_ms,
            "p99_ms": phase.p99_ms,
            "proxy_cpu_ms_per_req": phase.proxy_cpu_ms_per_req,
            "proxy_main_thread_cpu_ms_per_req": phase.proxy_main_thread_cpu_ms_per_req,
        }
        # Outside the measured window (warm-up, settling) the server also works for the proxy;
        # within it, its CPU is the proxy's writes and the revision polls.
        per_request = 1000 / phase.requests if phase.requests else 0.0
        figures["server_cpu_ms_per_req"] = (
            round((after - before) * per_request, 3) if backend.startswith("postgresql") else 0.0
        )
        figures["redis_cpu_ms_per_req"] = (
            round((redis_after - redis_before) * per_request, 3) if backend.endswith("+redis") else 0.0
        )
        figures["total_cpu_ms_per_req"] = round(
            (figures["proxy_cpu_ms_per_req"] or 0.0)
            + figures["server_cpu_ms_per_req"]
            + figures["redis_cpu_ms_per_req"],
            3,
        )
        return figures
    finally:
        env.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per round (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests first (default 200)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each of every backend in turn (default 2)")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated, in the order each round runs them (default {','.join(BACKENDS)})",
    )
    parser.add_argument("--client-rpm", type=int, default=0, help="the client's RPM limit (default: none)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="time limit of one phase (default 300)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        print(f"storage_cpu: unknown backend {unknown[0]!r} (one of {', '.join(BACKENDS)})", file=sys.stderr)
        return 2
    server = start_postgres()
    redis = start_redis()
    upstream_env = Environment(argparse.Namespace(verbose_proxies=False))
    try:
        upstream_proc, upstream = start_upstream(upstream_env.procs, "upstream", upstream_env.env, [])
        results = []
        for number in range(1, args.rounds + 1):
            for backend in backends:
                figures = asyncio.run(one_round(backend, server, redis, upstream, upstream_proc.pid, args))
                figures["round"] = number
                results.append(figures)
                print(json.dumps(figures), file=sys.stderr, flush=True)
    except BenchError as e:
        print(f"storage_cpu: {e}", file=sys.stderr)
        return 1
    finally:
        upstream_env.close()
        server.close()
        redis.close()
    print(f"client: {'RPM ' + str(args.client_rpm) if args.client_rpm else 'without limits'}")
    print(
        "| round | storage | req/s | p50 ms | p99 ms | proxy CPU ms/req | PostgreSQL CPU ms/req | Redis CPU ms/req"
        " | total ms/req |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['round']} | {r['backend']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} |"
            f" {r['proxy_cpu_ms_per_req']} | {r['server_cpu_ms_per_req']} | {r['redis_cpu_ms_per_req']} |"
            f" {r['total_cpu_ms_per_req']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
