"""What one failed attempt costs a request: latency and proxy CPU with and without a failover.

    .venv/bin/python bench/failover.py [--requests 400] [--rounds 3]

Two pools behind the same fake upstream (tests/fake_upstream.py), requests sent one at
a time over a keep-alive connection:
- `direct`: one good key; every request succeeds on its first attempt.
- `failover`: the same good key plus a key the upstream always answers with 500
  (prefix sk-flaky). Round robin offers the bad key first every time, so every
  request fails once and is retried on the good key (the circuit breaker is set
  out of reach so it never rests the bad key).
Figures: p50/p95 latency, the failover cost (p50 difference), and CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import httpx
from proxy_overhead import BenchError, Environment, cpu_seconds, percentile, settle, start_upstream

GOOD_KEY = "sk-bench-failover-good-000000000000000"
BAD_KEY = "sk-flaky-failover-bad-0000000000000000"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "benchmark request"}]}


def measure(url: str, key: str, pid: int, requests: int, warmup: int, stream: bool) -> dict[str, float]:
    body = {**CHAT, "stream": True} if stream else CHAT
    latencies = []
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=30) as client:
        for _ in range(warmup):
            client.post("/v1/chat/completions", json=body).raise_for_status()
        asyncio.run(settle(pid))
        cpu_before = cpu_seconds(pid)
        for _ in range(requests):
            started = time.perf_counter()
            response = client.post("/v1/chat/completions", json=body)
            if response.status_code != 200 or (stream and not response.text.endswith("data: [DONE]\n\n")):
                raise BenchError(f"request failed: {response.status_code} {response.text[:200]}")
            latencies.append((time.perf_counter() - started) * 1000)
        asyncio.run(settle(pid))
        cpu = cpu_seconds(pid) - cpu_before
    return {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "cpu_ms": cpu / requests * 1000}


def run(args: argparse.Namespace) -> dict[str, dict[str, list[dict[str, float]]]]:
    env = Environment(argparse.Namespace(verbose_proxies=False))
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        _, upstream = start_upstream(env.procs, "upstream", env.env, [])
        env.proxy_env["KEYROTOR_KEYPOOL_FAILURE_THRESHOLD"] = "1000000000"
        env.run_py("keys", "add", stdin=GOOD_KEY + "\n")
        env.client_key = env.run_py("clients", "add", "bench").strip().splitlines()[-1].strip()
        for pool in ("direct", "failover"):
            if pool == "failover":
                env.run_py("keys", "add", stdin=BAD_KEY + "\n")
            for round_ in range(args.rounds):
                target = env.start_proxy("keyrotor", upstream, f"{pool}-{round_}")
                for stream in (False, True):
                    figures = measure(target.url, target.key, target.pid, args.requests, args.warmup, stream)
                    phase = f"{pool} {'stream' if stream else 'chat'}"
                    results.setdefault(phase, {}).setdefault("rounds", []).append(figures)
                    print(
                        f"  round {round_ + 1}  {phase:<16} p50 {figures['p50']:.2f} ms  p95 {figures['p95']:.2f} ms"
                        f"  CPU {figures['cpu_ms']:.2f} ms/req",
                        flush=True,
                    )
                for proc, _ in list(env.procs.running):
                    if proc.pid == target.pid:
                        env.procs.stop(proc)
    finally:
        env.close()
    return results


def report(results: dict) -> str:
    med = {
        phase: {k: statistics.median(r[k] for r in v["rounds"]) for k in ("p50", "p95", "cpu_ms")}
        for phase, v in results.items()
    }
    lines = ["", "| phase | p50 ms | p95 ms | proxy CPU ms/request |", "|---|---|---|---|"]
    lines += [f"| {p} | {m['p50']:.2f} | {m['p95']:.2f} | {m['cpu_ms']:.2f} |" for p, m in med.items()]
    for kind in ("chat", "stream"):
        d, f = med[f"direct {kind}"], med[f"failover {kind}"]
        lines.append(
            f"\nfailover cost, {kind}: +{f['p50'] - d['p50']:.2f} ms at p50, "
            f"+{f['cpu_ms'] - d['cpu_ms']:.2f} ms CPU per request"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="measured requests per phase (default 400)")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured requests first (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="each phase this often; medians reported (default 3)")
    args = parser.parse_args(argv)
    try:
        print(report(run(args)))
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
