"""`run.py proxy --workers 2` end to end: the official openai client → two mitmproxy workers on one port → the fake upstream.

Each request here opens a fresh connection, so that the kernel's SO_REUSEPORT hash spreads
them over both workers (a keep-alive connection stays with one); every flow records which
worker served it. What must hold whichever worker a request reaches: a key upstream refused
through one worker is not used by the other; a client's RPM is exact across both; every
flow is recorded once; SIGTERM stops both after flushing; a killed worker is replaced.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ROOT, Keyrotor, free_port, port_open, wait_for
from tests.fake_upstream import FakeUpstream

GOOD = ["sk-good-work-aaaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-work-bbbbbbbbbbbbbbbbbbbbbbb0002"]
REVOKED = "sk-good-work-revokedxxxxxxxxxxxxxxxx0003"
MESSAGES = [{"role": "user", "content": "Say hello to the workers"}]
# docs/workers.md: a key state or rest learnt by one worker reaches the others within 50 ms; the
# test gives it twice that before it counts on it (a bound under test, not a synchronisation).
PROPAGATION_BOUND = 0.1
START_DEADLINE = 60.0


def start_workers(kr: Keyrotor, *extra: str) -> subprocess.Popen:
    """The proxy with two workers; returns the supervisor once both listen."""
    kr.start_proxy("--workers", "2", *extra)
    wait_for(lambda: kr.logs().count("listening at") >= 2, START_DEADLINE, what="both workers listening")
    return kr.processes[-1]


async def fresh_connections(kr: Keyrotor, key: str, count: int, concurrent: bool = True) -> list[int]:
    """`count` chat requests, each on a connection of its own; their statuses."""

    async def one() -> int:
        client = openai.AsyncOpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=30)
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            return 200
        except openai.APIStatusError as e:
            return e.status_code
        finally:
            await client.close()

    if concurrent:
        return list(await asyncio.gather(*(one() for _ in range(count))))
    return [await one() for _ in range(count)]


def send(kr: Keyrotor, key: str, count: int, concurrent: bool = True) -> list[int]:
    return asyncio.run(fresh_connections(kr, key, count, concurrent))


def workers_of(kr: Keyrotor, after_id: int = 0) -> Counter:
    return Counter(row["worker"] for row in kr.query("SELECT worker FROM flows WHERE id > ?", (after_id,)))


def flow_count(kr: Keyrotor) -> int:
    return kr.query("SELECT count(*) AS n FROM flows")[0]["n"]


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def worker_pids(supervisor: subprocess.Popen) -> dict[int, int]:
    """Worker index → pid, read from the supervisor's children's command lines."""
    found = {}
    for pid in children(supervisor.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--worker-index" in argv:
            found[int(argv[argv.index(b"--worker-index") + 1])] = pid
    return found


@pytest.fixture
def kr(keyrotor: Keyrotor) -> Keyrotor:
    keyrotor.add_keys(*GOOD)
    return keyrotor


def test_both_workers_serve_and_every_flow_is_recorded_once(kr: Keyrotor, upstream: FakeUpstream):
    key = kr.add_client("spread")
    start_workers(kr)

    assert send(kr, key, 40) == [200] * 40

    wait_for(lambda: flow_count(kr) >= 40, what="40 flows recorded")
    rows = kr.query("SELECT flow_id, worker, status FROM flows")
    assert len(rows) == 40 == len({row["flow_id"] for row in rows})  # once each, none twice
    assert {row["status"] for row in rows} == {200}
    served = Counter(row["worker"] for row in rows)
    assert set(served) == {0, 1}, served  # fresh connections reach both workers
    assert len(upstream.received) == 40


def test_an_rpm_limit_is_exact_across_both_workers(kr: Keyrotor, upstream: FakeUpstream):
    key = kr.setup("clients", "add", "burst", "--rpm", "5").stdout.strip().splitlines()[-1]
    start_workers(kr)

    statuses = send(kr, key, 20)

    assert statuses.count(200) == 5, statuses
    assert statuses.count(429) == 15, statuses
    assert len(upstream.received) == 5
    wait_for(lambda: flow_count(kr) >= 20, what="20 flows recorded")
    refused = kr.query("SELECT worker FROM flows WHERE refusal = 'rate_limit_exceeded'")
    assert len(refused) == 15
    assert set(workers_of(kr)) == {0, 1}  # both admitted or refused some: the count is shared, not per worker


def test_a_key_refused_through_one_worker_is_never_used_by_the_other(kr: Keyrotor, upstream: FakeUpstream):
    kr.add_keys(REVOKED)
    upstream.set_key(REVOKED, "invalid")
    key = kr.add_client("victim")
    start_workers(kr)

    # One request at a time until one of them meets the revoked key (and is retried on a good one).
    for _ in range(20):
        assert send(kr, key, 1) == [200]
        if REVOKED in upstream.keys_seen():
            break
    assert upstream.keys_seen().count(REVOKED) == 1
    time.sleep(PROPAGATION_BOUND)
    wait_for(lambda: kr.query("SELECT count(*) AS n FROM flows WHERE attempts = 2")[0]["n"] == 1, what="the retry")
    learnt_by = kr.query("SELECT worker FROM flows WHERE attempts = 2")[0]["worker"]
    before = kr.query("SELECT coalesce(max(id), 0) AS id FROM flows")[0]["id"]

    assert send(kr, key, 30) == [200] * 30

    assert upstream.keys_seen().count(REVOKED) == 1  # neither worker sent it again
    wait_for(lambda: sum(workers_of(kr, before).values()) >= 30, what="30 more flows")
    assert workers_of(kr, before)[1 - learnt_by] > 0  # the other worker served some of them, without it
    assert kr.query("SELECT state FROM upstream_keys WHERE state = 'invalid'")  # and storage knows it


def test_sigterm_stops_both_workers_and_flushes_their_captures(kr: Keyrotor, upstream: FakeUpstream):
    key = kr.add_client("stopper")
    supervisor = start_workers(kr)
    workers = worker_pids(supervisor)
    assert len(workers) == 2

    assert send(kr, key, 30) == [200] * 30
    supervisor.send_signal(signal.SIGTERM)

    assert supervisor.wait(60) == 0
    assert flow_count(kr) == 30  # every worker wrote what it held before it ended
    assert set(workers_of(kr)) == {0, 1}
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers.values())
    assert not port_open(kr.proxy_port or 0)


def test_a_killed_worker_is_replaced_and_the_port_keeps_serving(kr: Keyrotor, upstream: FakeUpstream):
    key = kr.add_client("survivor")
    supervisor = start_workers(kr)
    before = worker_pids(supervisor)

    os.kill(before[1], signal.SIGKILL)
    wait_for(lambda: worker_pids(supervisor).get(1) != before[1], what="worker 1 gone")
    assert send(kr, key, 10) == [200] * 10  # worker 0 serves meanwhile

    wait_for(lambda: worker_pids(supervisor).get(1) not in (None, before[1]), START_DEADLINE, what="a new worker 1")
    wait_for(lambda: kr.logs().count("listening at") >= 3, START_DEADLINE, what="the new worker listening")
    assert worker_pids(supervisor)[0] == before[0]  # the other one kept running
    mark = kr.query("SELECT coalesce(max(id), 0) AS id FROM flows")[0]["id"]
    assert send(kr, key, 30) == [200] * 30
    wait_for(lambda: sum(workers_of(kr, mark).values()) >= 30, what="30 more flows")
    assert workers_of(kr, mark)[1] > 0  # the replacement serves
    assert "proxy worker 1 ended" in kr.logs()


@pytest.mark.parametrize("stop", ["sigterm-to-run.py", "ctrl-c-to-the-terminal-group"])
def test_serve_runs_the_ui_once_beside_the_workers_and_stops_them_all(kr: Keyrotor, upstream: FakeUpstream, stop: str):
    key = kr.add_client("serving")
    kr.proxy_port, ui_port = free_port(), free_port()
    serve = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "serve", "--workers", "2", "--proxy-port", str(kr.proxy_port)]
        + ["--ui-port", str(ui_port), "--upstream", upstream.url],
        env=kr.env,
        cwd=kr.tmp,
        stdout=kr.log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, like a shell job
    )
    kr.processes.append(serve)
    wait_for(lambda: kr.logs().count("listening at") >= 2 and port_open(ui_port), START_DEADLINE, what="all up")
    (supervisor,) = [pid for pid in children(serve.pid) if b"\0proxy\0" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    uis = [pid for pid in children(serve.pid) if b"\0ui\0" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(uis) == 1 and len(children(supervisor)) == 2  # one UI, two workers
    assert httpx.get(f"http://127.0.0.1:{ui_port}/health").json() == {"status": "ok"}
    assert send(kr, key, 10) == [200] * 10

    if stop == "sigterm-to-run.py":
        serve.send_signal(signal.SIGTERM)
    else:
        os.killpg(serve.pid, signal.SIGINT)  # what Ctrl-C does: every process of the job gets it

    assert serve.wait(60) == 0, kr.logs()
    assert flow_count(kr) == 10
    assert not port_open(kr.proxy_port) and not port_open(ui_port)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--workers", "0"), "proxy.workers must be a whole number above zero"),
        (("--workers", "many"), "proxy.workers must be a whole number above zero"),
        (("--workers", "2", "--web"), "--web runs mitmweb"),
    ],
)
def test_a_worker_count_that_cannot_work_is_refused_at_start(kr: Keyrotor, args: tuple[str, ...], message: str):
    result = kr.cli("proxy", *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
