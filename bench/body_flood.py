"""The proxy's memory under large request bodies that nobody may send.

Starts the fake upstream and `run.py proxy` (of this tree, or of the tree given with
--root), then N clients at once each POST a body of --mb megabytes without a client
key, the Content-Length announced up front, written as fast as the proxy takes it.
While they run it samples the proxy's resident memory; at the end it prints the
proxy's RSS before, its peak (VmHWM) and what every client got back.

    .venv/bin/python bench/body_flood.py                       # 4 clients x 250 MB
    .venv/bin/python bench/body_flood.py --root /tmp/wt-before  # the same against another checkout
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from proxy_overhead import (
    HOST,
    PYTHON,
    ROOT,
    BenchError,
    Processes,
    free_port,
    isolated_env,
    run_facts,
    start_upstream,
    stop_on_sigterm,
    wait_for_port,
)

CHUNK = 1 << 20
CLIENT_TIMEOUT = 120.0  # seconds a client may wait on one send or on the answer
SAMPLE_SECONDS = 0.05


@dataclass
class Outcome:
    sent_mb: float
    answer: str  # the status line, or the error that ended the exchange
    seconds: float


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {field} in /proc/{pid}/status")


def flood(port: int, size: int) -> Outcome:
    """One unauthenticated POST of `size` zero bytes; what came back and how much was sent."""
    started = time.monotonic()
    sent = 0
    answer = ""
    head = (
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    chunk = bytes(CHUNK)
    with socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT) as sock:
        try:
            sock.sendall(head)
            while sent < size:
                n = min(CHUNK, size - sent)
                sock.sendall(chunk[:n])
                sent += n
        except OSError as e:
            answer = f"send stopped: {e.__class__.__name__}"
        try:
            first = sock.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
            answer = first or answer or "closed without an answer"
        except OSError as e:
            answer = answer or f"no answer: {e.__class__.__name__}"
    return Outcome(round(sent / 1e6, 1), answer, round(time.monotonic() - started, 2))


def setup(root: Path, tmp: Path, env: dict[str, str]) -> None:
    import subprocess

    run = [PYTHON, str(root / "run.py")]
    subprocess.run(
        [*run, "keys", "add"],
        input="sk-bench-flood000000000000000000000001\n",
        text=True,
        env=env,
        cwd=tmp,
        check=True,
        capture_output=True,
    )
    subprocess.run([*run, "clients", "add", "bench"], env=env, cwd=tmp, check=True, capture_output=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the keyrotor checkout whose run.py to start")
    parser.add_argument("--clients", type=int, default=4, help="concurrent posts (default 4)")
    parser.add_argument("--mb", type=int, default=250, help="body size of each post in MB (default 250)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    stop_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="kr-flood-"))
    procs = Processes(tmp)
    env = isolated_env(tmp)
    try:
        _, upstream_url = start_upstream(procs, "upstream", env, [])
        setup(args.root, tmp, env)
        port = free_port()
        argv_proxy = [PYTHON, str(args.root / "run.py"), "proxy", "--proxy-port", str(port), "--upstream", upstream_url]
        proxy, log_path = procs.start("proxy", argv_proxy, env)
        wait_for_port(port, proxy, log_path, "the proxy")
        before_kb = status_kb(proxy.pid, "VmRSS")
        outcomes: list[Outcome | None] = [None] * args.clients

        def client(i: int) -> None:
            try:
                outcomes[i] = flood(port, args.mb * 1_000_000)
            except OSError as e:
                outcomes[i] = Outcome(0, f"connect failed: {e}", 0)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        peak_sampled = before_kb
        while any(t.is_alive() for t in threads):
            peak_sampled = max(peak_sampled, status_kb(proxy.pid, "VmRSS"))
            time.sleep(SAMPLE_SECONDS)
        for t in threads:
            t.join()
        figures = {
            "rss_before_mb": round(before_kb / 1024, 1),
            "rss_peak_mb": round(max(peak_sampled, status_kb(proxy.pid, "VmHWM")) / 1024, 1),
            "rss_after_mb": round(status_kb(proxy.pid, "VmRSS") / 1024, 1),
            "clients": [asdict(o) for o in outcomes if o],
        }
    except BenchError as e:
        print(f"body_flood: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("body_flood: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.clients} unauthenticated posts of {args.mb} MB each, proxy from {args.root}")
    print(
        f"proxy RSS: {figures['rss_before_mb']} MB before, peak {figures['rss_peak_mb']} MB,"
        f" {figures['rss_after_mb']} MB after"
    )
    for i, o in enumerate(figures["clients"]):
        print(f"  client {i + 1}: sent {o['sent_mb']} MB in {o['seconds']} s, got {o['answer']!r}")
    if args.json:
        args.json.write_text(json.dumps({**run_facts(started, args), **figures}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
