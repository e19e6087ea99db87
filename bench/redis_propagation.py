"""Redis between nodes (docs/redis.md): how fast a key state change reaches another node, and what a limit
decision costs the event loop with Redis rather than in memory.

    PYTHONPATH=$PWD .venv/bin/python bench/redis_propagation.py [--changes 500] [--admits 2000] [--proxies 30]

Starts its own redis-server on a free loopback port (tests/services.py; Debian's redis-server).
Two nodes are two sets of storage/redis_shared.py objects in this process, each with its own
connections and threads, as two proxies would have:

- propagation: node A publishes a key state change (what it does when upstream answers 401); the
  time until node B's event loop runs its delivery (where the key pool would take the key out).
  Node B's loop runs in a thread of its own, as a proxy's does. p50/p99/max over --changes changes.
- --proxies N: end to end, with two real proxies (`run.py proxy`, one database, one Redis) in front
  of the fake upstream: N times, a new key the upstream refuses (401) is added, requests go to node
  A until A marks it invalid, and node B logs that it learnt so; the time between the two log lines
  (millisecond timestamps, one clock). Node B is never sent a request in the meantime.
- admit: Governor.admit + settle for a client with an RPM limit and a daily token budget (the
  decision every limited request makes on the loop), on RedisCounters vs the in-memory counters of
  one process: wall time per decision (the loop is blocked that long) and this process's CPU per
  decision (Redis's own CPU is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.limits import ClientPolicy, Governor, Ticket  # noqa: E402
from core.models import KeyState, KeyStateChange  # noqa: E402
from storage import db, redis_shared  # noqa: E402
from storage.counters import MemoryCounters  # noqa: E402
from tests.services import start_redis  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def propagation(url: str, database: Path, changes: int) -> list[float]:
    _, _, sender = redis_shared.open_redis(url, database, MemoryCounters())
    _, _, receiver = redis_shared.open_redis(url, database, MemoryCounters())
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    sent: dict[int, float] = {}
    took: list[float] = []
    done = threading.Event()

    def deliver(learnt: list) -> None:  # on node B's loop
        now = time.perf_counter()
        for change in learnt:
            if isinstance(change, KeyStateChange) and change.key_id in sent:
                took.append(now - sent.pop(change.key_id))
        if len(took) >= changes:
            done.set()

    receiver.loop, receiver.deliver = loop, deliver
    sender.start()
    receiver.start()
    time.sleep(0.5)  # both joined
    for i in range(changes):
        sent[i] = time.perf_counter()
        sender.publish_state(KeyStateChange(i, KeyState.INVALID, "401 invalid_api_key", None, time.time()))
        time.sleep(0.005)
    done.wait(30)
    sender.stop()
    receiver.stop()
    loop.call_soon_threadsafe(loop.stop)
    return took


def through_proxies(url: str, trials: int) -> list[float]:
    """Node A learns a 401 from upstream; how long until node B's log says it knows (see the module doc)."""
    import os
    import re
    import shutil

    import httpx

    from tests.conftest import ADMIN_KEY, ROOT, Keyrotor, wait_for
    from tests.fake_upstream import FakeUpstream

    top = Path(tempfile.mkdtemp(prefix="keyrotor-bench-nodes-"))
    took = []
    with FakeUpstream().start() as upstream:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYROTOR_")}
        env.update(
            KEYROTOR_STORAGE_PATH=str(top / "keyrotor.db"),
            KEYROTOR_ADMIN_KEY=ADMIN_KEY,
            KEYROTOR_CONFIG=str(ROOT / "config.toml"),
            KEYROTOR_REDIS_URL=url,
            PYTHONUNBUFFERED="1",
        )
        kr = Keyrotor(tmp=top, upstream_url=upstream.url, env=env)
        try:
            kr.add_keys("sk-good-bench-aaaaaaaaaaaaaaaaaaaaaaaa0001")
            client_key = kr.add_client("bench")
            ports = []
            for _ in range(2):
                kr.start_proxy()
                ports.append(kr.proxy_port)
            stamp = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\.(\d{3})\] (.*)$", re.M)

            def seconds_of(line_pattern: str) -> float | None:
                for h, m, sec, ms, text in stamp.findall(kr.logs()):
                    if re.search(line_pattern, text):
                        return int(h) * 3600 + int(m) * 60 + int(sec) + int(ms) / 1000
                return None

            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            for trial in range(trials):
                last4 = f"{trial:04d}"
                kr.setup("keys", "add", input=f"sk-revoked-bench-{'x' * 20}{last4}\n")
                wait_for(lambda n=trial: kr.logs().count(f"upstream keys: {n + 2},") >= 2, 10, what="both reloaded")
                learnt_a = f"…{last4} is now invalid \\(.*\\)$"  # its own line; node B's ends "…another proxy learnt"
                learnt_b = f"…{last4} is now invalid .*another proxy learnt"
                with httpx.Client(timeout=30) as http:
                    for _ in range(10):
                        http.post(
                            f"http://127.0.0.1:{ports[0]}/v1/chat/completions",
                            json=body,
                            headers={"Authorization": f"Bearer {client_key}"},
                        )
                        if seconds_of(learnt_a) is not None:
                            break
                wait_for(lambda b=learnt_b: seconds_of(b) is not None, 10, what="node B learnt")
                a, b = seconds_of(learnt_a), seconds_of(learnt_b)
                assert a is not None and b is not None
                took.append(b - a)
        finally:
            kr.stop()
            shutil.rmtree(top, ignore_errors=True)
    return took


def admits(governor: Governor, count: int) -> tuple[list[float], float]:
    policy = ClientPolicy(rpm=10**9, daily_tokens=10**12)
    body = b'{"model": "gpt-4o-mini", "max_tokens": 10, "messages": []}'
    walls = []
    cpu = time.process_time()
    for i in range(count):
        started = time.perf_counter()
        outcome = governor.admit(
            f"f{i}", 1, policy, "gpt-4o-mini", body, None, time.time(), path="/v1/chat/completions"
        )
        assert isinstance(outcome, Ticket)
        governor.settle(f"f{i}", {"total_tokens": 20}, None, time.time())
        walls.append(time.perf_counter() - started)
    return walls, (time.process_time() - cpu) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=500)
    parser.add_argument("--admits", type=int, default=2000)
    parser.add_argument("--proxies", type=int, default=0, help="also measure through two real proxies, N times")
    args = parser.parse_args()
    server = start_redis()
    top = Path(tempfile.mkdtemp(prefix="keyrotor-bench-redis-"))
    database = top / "kr.db"
    db.ensure_database(database)
    try:
        took = propagation(server.url, database, args.changes)
        ms = [t * 1000 for t in took]
        print(
            f"key state change, node A → node B's loop ({len(ms)} of {args.changes}): p50 {percentile(ms, 50):.2f} ms,"
            f" p99 {percentile(ms, 99):.2f} ms, max {max(ms):.2f} ms"
        )
        if args.proxies:
            ms = [t * 1000 for t in through_proxies(server.url, args.proxies)]
            print(
                f"key state change through two proxies, node A's log → node B's log ({len(ms)} keys, ms timestamps):"
                f" p50 {percentile(ms, 50):.0f} ms, p99 {percentile(ms, 99):.0f} ms, max {max(ms):.0f} ms"
            )
        _, counters, _ = redis_shared.open_redis(server.url, database, MemoryCounters())
        shared = Governor(counters)
        shared.reserved = redis_shared.RedisHolds(counters)
        for name, governor in (("in memory (one process)", Governor(MemoryCounters())), ("Redis", shared)):
            walls, cpu = admits(governor, args.admits)
            us = [w * 1e6 for w in walls]
            print(
                f"admit + settle, {name}: wall p50 {percentile(us, 50):.0f} µs, p99 {percentile(us, 99):.0f} µs,"
                f" mean {statistics.fmean(us):.0f} µs; CPU of this process {cpu * 1e6:.0f} µs per request"
            )
        counters.stop()
    finally:
        server.close()


if __name__ == "__main__":
    main()
