"""The proxy's memory after authenticated uploads below the size limit: back near idle, or ratcheted?

Starts the fake upstream and `run.py proxy` (of this tree, or of --root), then sends
--bursts bursts of --clients concurrent multipart uploads (POST /v1/audio/transcriptions,
a file of --mb MiB each, under proxy.max_body_bytes) with a client key, as the official
SDK would. It samples the proxy's resident memory throughout and prints its RSS idle,
its peak, and after each burst (once the proxy has been idle --settle seconds).

    .venv/bin/python bench/upload_memory.py                        # 2 bursts of 8 x 99 MiB
    .venv/bin/python bench/upload_memory.py --root /tmp/wt-before  # the same against another checkout
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from body_flood import status_kb
from proxy_overhead import (
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

SAMPLE_SECONDS = 0.05
CLIENT_TIMEOUT = 300.0
UPSTREAM_KEY = "sk-bench-upload00000000000000000000001"


def setup(root: Path, tmp: Path, env: dict[str, str]) -> str:
    run = [PYTHON, str(root / "run.py")]
    subprocess.run([*run, "keys", "add"], input=UPSTREAM_KEY + "\n", text=True, env=env, cwd=tmp, check=True)
    added = subprocess.run([*run, "clients", "add", "bench"], env=env, cwd=tmp, check=True, capture_output=True)
    return added.stdout.decode().strip().splitlines()[-1]


def upload(base_url: str, client_key: str, size: int) -> str:
    """One multipart upload of `size` bytes; the status it got."""
    files = {"file": ("audio.wav", os.urandom(1024) * (size // 1024), "audio/wav")}
    try:
        answer = httpx.post(
            f"{base_url}/audio/transcriptions",
            headers={"authorization": f"Bearer {client_key}"},
            data={"model": "whisper-1"},
            files=files,
            timeout=CLIENT_TIMEOUT,
        )
    except httpx.HTTPError as e:
        return f"failed: {e.__class__.__name__}"
    return str(answer.status_code)


def settle(pid: int, seconds: float) -> float:
    """The proxy's RSS in MB once it has been idle `seconds` (its lowest over the last second)."""
    time.sleep(max(0.0, seconds - 1))
    lowest = status_kb(pid, "VmRSS")
    for _ in range(10):
        time.sleep(0.1)
        lowest = min(lowest, status_kb(pid, "VmRSS"))
    return round(lowest / 1024, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the keyrotor checkout whose run.py to start")
    parser.add_argument("--clients", type=int, default=8, help="concurrent uploads per burst (default 8)")
    parser.add_argument("--mb", type=int, default=99, help="file size of each upload in MiB (default 99)")
    parser.add_argument("--bursts", type=int, default=2, help="bursts, one after the other (default 2)")
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before 'after' is read (default 5)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    stop_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="kr-upload-"))
    procs = Processes(tmp)
    env = isolated_env(tmp)
    env["PYTHONPATH"] = str(args.root)
    try:
        _, upstream_url = start_upstream(procs, "upstream", env, [])
        client_key = setup(args.root, tmp, env)
        port = free_port()
        argv_proxy = [PYTHON, str(args.root / "run.py"), "proxy", "--proxy-port", str(port), "--upstream", upstream_url]
        proxy, log_path = procs.start("proxy", argv_proxy, env)
        wait_for_port(port, proxy, log_path, "the proxy")
        base_url = f"http://127.0.0.1:{port}/v1"
        upload(base_url, client_key, 1024)  # one small upload: the code paths loaded, the writer started
        idle = settle(proxy.pid, args.settle)
        peak_kb = 0
        bursts = []
        for _ in range(args.bursts):
            answers: list[str] = [""] * args.clients

            def client(i: int, answers: list[str] = answers) -> None:
                answers[i] = upload(base_url, client_key, args.mb * 2**20)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peak_kb = max(peak_kb, status_kb(proxy.pid, "VmRSS"))
                time.sleep(SAMPLE_SECONDS)
            bursts.append({"answers": answers, "rss_after_mb": settle(proxy.pid, args.settle)})
        figures = {
            "rss_idle_mb": idle,
            "rss_peak_mb": round(max(peak_kb, status_kb(proxy.pid, "VmHWM")) / 1024, 1),
            "bursts": bursts,
        }
    except BenchError as e:
        print(f"upload_memory: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("upload_memory: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.bursts} bursts of {args.clients} authenticated uploads of {args.mb} MiB, proxy from {args.root}")
    print(f"proxy RSS: {figures['rss_idle_mb']} MB idle, peak {figures['rss_peak_mb']} MB")
    for n, burst in enumerate(figures["bursts"], 1):
        print(f"  after burst {n}: {burst['rss_after_mb']} MB; answers {burst['answers']}")
    if args.json:
        args.json.write_text(json.dumps({**run_facts(started, args), **figures}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
