"""Instructions per request: bare mitmdump vs keyrotor's full chain, counted by valgrind.

    .venv/bin/python bench/proxy_instructions.py [--requests 200] [--routes 5 4 50] [--limits] [--streams 100] [--otel]

With --routes U G M it also counts keyrotor with U upstreams of G groups of M models each
(the default group disabled, the requested model listed by the last group only), in the
same run: what routing by model costs against the one default group. With --limits it
also counts keyrotor with the bench client given every client limit (models, groups, RPM,
TPM, parallel, daily and monthly token and cost budgets, expiry, IPs; none of them reached),
plus [access] ip_rpm: what client governance costs against the same client with none.
With --streams N it also counts N streamed chat completions (the fake upstream's 5 content
chunks, its usage chunk asked for by keyrotor) through bare mitmdump with stream_large_bodies=1
(so it streams them too, the like-for-like baseline) and through keyrotor, per stream.
With --otel it also counts keyrotor with otel.endpoint set (docs/otel.md), exporting to a local
OTLP/HTTP sink: what tracing costs a request, its export thread included.

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
from proxy_overhead import BenchError, Environment, settle, start_upstream

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "benchmark request"}]}
STREAM = {**BODY, "stream": True}


def count_instructions(
    env: Environment,
    kind: str,
    upstream: str,
    requests: int,
    warmup: int,
    label: str | None = None,
    stream: bool = False,
) -> float:
    """Millions of instructions per request that the proxy `kind` executed (`label` names its files);
    with `stream`, per streamed completion read to its end."""
    label = label or kind
    out = env.tmp / f"{label}.callgrind"
    wrapper = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}")
    target = env.start_proxy(kind, upstream, label, wrapper)
    headers = {"authorization": f"Bearer {target.key}"}
    with httpx.Client(base_url=target.url, headers=headers, timeout=120) as client:

        def one() -> None:
            if not stream:
                client.post("/v1/chat/completions", json=BODY).raise_for_status()
                return
            with client.stream("POST", "/v1/chat/completions", json=STREAM) as response:
                response.raise_for_status()
                if b"[DONE]" not in b"".join(response.iter_bytes()):
                    raise BenchError(f"{label}: a stream ended without [DONE]")

        for _ in range(warmup):
            one()
        asyncio.run(settle(target.pid))
        subprocess.run(["callgrind_control", "-i", "on", str(target.pid)], check=True, capture_output=True)
        for _ in range(requests):
            one()
        asyncio.run(settle(target.pid))  # the writer's rows are part of the cost
        subprocess.run(["callgrind_control", "-d", str(target.pid)], check=True, capture_output=True)
    dumps = sorted(env.tmp.glob(f"{label}.callgrind.*"))
    if not dumps:
        raise BenchError(f"callgrind wrote no dump for {label}")
    totals = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(), re.M)
    if not totals:
        raise BenchError(f"no totals in {dumps[-1]}")
    for pid_proc in list(env.procs.running):
        if pid_proc[0].pid == target.pid:
            env.procs.stop(pid_proc[0])
    return int(totals.group(1)) / requests / 1e6


def add_routes(db_path: Path, upstream: str, upstreams: int, groups: int, models: int, model: str) -> None:
    """Upstreams × groups × models, all at `upstream`, each group with two keys; `model` in the last group only."""
    from core.keys import NewKey
    from core.routing import Dialect
    from storage import db, routes, secrets, upstream_keys

    conn = db.connect(db_path)
    cipher = secrets.key_cipher(db_path)
    try:
        routes.set_group_enabled(conn, routes.group_id_of(conn, "default/default"), False)
        for u in range(upstreams):
            routes.add_upstream(conn, f"up{u}", upstream, Dialect.OPENAI, None)
            for g in range(groups):
                group_id = routes.add_group(conn, f"up{u}/g{g}", priority=g)
                names = [f"model-{u}-{g}-{i}" for i in range(models)]
                if u == upstreams - 1 and g == groups - 1:
                    names[-1] = model
                for name in names:
                    routes.add_model(conn, group_id, name, None)
                keys = [NewKey(f"sk-bench-route-{u}-{g}-{n}-{'x' * 20}") for n in range(2)]
                upstream_keys.insert_keys(conn, cipher, keys, group_id)
    finally:
        conn.close()


# Every limit set, none reached by the bench's requests: the checks and counting run on each one.
EVERY_LIMIT = {
    "models": "gpt-4o*,gpt-5*",
    "groups": "default/default",
    "rpm": "100000000",
    "tpm": "1000000000",
    "max_parallel": "1000",
    "daily_tokens": "1000000000000",
    "monthly_tokens": "1000000000000",
    "daily_usd": "1000000000",
    "monthly_usd": "1000000000",
    "expires_at": "2999-01-01",
    "ips": "127.0.0.0/8,::1",
}


def set_every_limit(db_path: Path, name: str) -> None:
    from storage import client_keys, db

    conn = db.connect(db_path)
    try:
        client_keys.set_limits(conn, name, EVERY_LIMIT)
    finally:
        conn.close()


def count_traced(env: Environment, upstream: str, args: argparse.Namespace) -> tuple[float, int]:
    """keyrotor's count with OpenTelemetry on (docs/otel.md), exporting to a local OTLP/HTTP sink that
    decodes what it gets; and how many spans it got."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.fake_collector import FakeCollector

    traced = {"KEYROTOR_OTEL_ENDPOINT": "", "OTEL_BSP_SCHEDULE_DELAY": "1000"}
    with FakeCollector() as collector:
        traced["KEYROTOR_OTEL_ENDPOINT"] = collector.url
        env.proxy_env.update(traced)
        try:
            count = count_instructions(env, "keyrotor", upstream, args.requests, args.warmup, "keyrotor-otel")
        finally:
            for name in traced:
                env.proxy_env.pop(name, None)
        return count, len(collector.spans)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="measured requests per proxy (default 200)")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured requests first (default 30)")
    parser.add_argument(
        "--routes", type=int, nargs=3, metavar=("UPSTREAMS", "GROUPS", "MODELS"), help="also count with these routes"
    )
    parser.add_argument("--limits", action="store_true", help="also count with every client limit set")
    parser.add_argument("--streams", type=int, default=0, help="also count this many streamed completions each")
    parser.add_argument(
        "--otel", action="store_true", help="also count with otel.endpoint set, exporting to a local OTLP/HTTP sink"
    )
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
        if args.otel:
            counts["keyrotor-otel"], spans = count_traced(env, upstream, args)
        if args.streams:
            for kind, label in (("mitmdump-stream", "mitmdump-stream"), ("keyrotor", "keyrotor-stream")):
                counts[label] = count_instructions(
                    env, kind, upstream, args.streams, min(args.warmup, args.streams), label, stream=True
                )
        if args.routes:
            add_routes(env.db_path, upstream, *args.routes, model=BODY["model"])
            label = "keyrotor-routes"
            counts[label] = count_instructions(env, "keyrotor", upstream, args.requests, args.warmup, label)
        if args.limits:
            set_every_limit(env.db_path, "bench")
            env.proxy_env["KEYROTOR_ACCESS_IP_RPM"] = "100000000"
            counts["keyrotor-limits"] = count_instructions(
                env, "keyrotor", upstream, args.requests, args.warmup, "keyrotor-limits"
            )
        for kind, count in counts.items():
            print(f"{kind:<15} {count:7.3f} M instructions/request")
        print(
            f"ratio           {counts['keyrotor'] / counts['mitmdump']:7.3f}x  (target < 1.0x, issue 22; "
            f"{args.requests} sequential requests each, {time.monotonic() - started:.0f} s)"
        )
        if args.streams:
            print(
                f"stream ratio    {counts['keyrotor-stream'] / counts['mitmdump-stream']:7.3f}x  (per streamed"
                f" completion, {args.streams} each; bare mitmdump with stream_large_bodies=1)"
            )
        if args.routes:
            u, g, m = args.routes
            print(
                f"routes ratio    {counts['keyrotor-routes'] / counts['mitmdump']:7.3f}x  ({u} upstreams x {g} groups"
                f" x {m} models; {counts['keyrotor-routes'] / counts['keyrotor']:.3f}x the one default group)"
            )
        if args.otel:
            chain, traced = counts["keyrotor"], counts["keyrotor-otel"]
            print(
                f"otel            {traced / chain:7.3f}x the chain without it (+{traced - chain:.3f} M a request,"
                f" export thread included; {spans} spans received)"
            )
        if args.limits:
            chain, limited = counts["keyrotor"], counts["keyrotor-limits"]
            print(
                f"limits          {limited / chain:7.3f}x the same client with none"
                f" (+{limited - chain:.3f} M, {100 * (limited - chain) / chain:.1f} % of the chain; target < 5 %)"
            )
        return 0
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        env.close()


if __name__ == "__main__":
    sys.exit(main())
