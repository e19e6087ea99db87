"""Two keyrotor nodes on one Redis (`[redis] url`), end to end: the official openai client → two real
`run.py proxy` processes → the fake upstream.

The two nodes are separate proxies on their own ports, as two machines behind a load balancer
would be; they share one SQLite database file here (on this machine), and would share one
PostgreSQL database across machines ([storage] url). What must hold whichever node a request
reaches: a key upstream refused through one node is not used by the other; a client's RPM and
budget are exact across both; Redis going away (at start, or restarted mid-load) fails no
client request, limits are still counted on each node meanwhile, and coordination resumes.
"""

from __future__ import annotations

import asyncio
import html
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from storage import db, redis_shared
from tests.conftest import ADMIN_KEY, Keyrotor, wait_for
from tests.fake_upstream import FakeUpstream
from tests.services import RedisServer

GOOD = ["sk-good-redis-aaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-redis-bbbbbbbbbbbbbbbbbbbbbb0002"]
REVOKED = "sk-good-redis-revokedxxxxxxxxxxxxxxx0003"
MESSAGES = [{"role": "user", "content": "Say hello to both nodes"}]
# docs/redis.md: a key state learnt by one node reaches the others within 50 ms; the test gives it
# twice that before it counts on it (a bound under test, not a synchronisation).
PROPAGATION_BOUND = 0.1


class Nodes:
    """Two proxies (nodes) of one installation: same database, same Redis, each on its own port."""

    def __init__(self, kr: Keyrotor) -> None:
        self.kr = kr
        self.ports: list[int] = []

    def start(self, count: int = 2) -> Nodes:
        for _ in range(count):
            self.kr.start_proxy()
            assert self.kr.proxy_port is not None
            self.ports.append(self.kr.proxy_port)
        return self

    def url(self, node: int) -> str:
        return f"http://127.0.0.1:{self.ports[node]}/v1"


async def _requests(url: str, key: str, count: int, max_tokens: int | None = None) -> list[int]:
    """`count` chat requests at once, each on a connection of its own; their statuses."""

    async def one() -> int:
        client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)
        try:
            extra = {"max_tokens": max_tokens} if max_tokens else {}
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **extra)  # type: ignore[call-overload]
            return 200
        except openai.APIStatusError as e:
            return e.status_code
        finally:
            await client.close()

    return list(await asyncio.gather(*(one() for _ in range(count))))


def send(nodes: Nodes, node: int, key: str, count: int = 1, max_tokens: int | None = None) -> list[int]:
    return asyncio.run(_requests(nodes.url(node), key, count, max_tokens))


def burst(nodes: Nodes, key: str, each: int) -> list[list[int]]:
    """`each` requests to every node, all at once."""

    async def both() -> list[list[int]]:
        return list(await asyncio.gather(*(_requests(nodes.url(n), key, each) for n in range(len(nodes.ports)))))

    return asyncio.run(both())


def spend_until_refused(nodes: Nodes, key: str) -> int:
    """Requests alternately through each node until the client's budget refuses one (429); then both
    nodes refuse: the budget is one, not one per node. How many were served (3 more were refused)."""
    for served in range(60):
        status = send(nodes, served % 2, key, max_tokens=5)[0]
        if status != 200:
            assert status == 429
            break
    else:
        pytest.fail("the budget never refused")
    assert send(nodes, 0, key, max_tokens=5) == [429]
    assert send(nodes, 1, key, max_tokens=5) == [429]
    return served


@pytest.fixture(autouse=True)
def _announce_only_to_this_tests_redis() -> Iterator[None]:
    """kr.setup() runs the CLI in this process, which announces admin changes to the test's Redis."""
    yield
    db.revision_announcers.clear()
    redis_shared._announcing.clear()


@pytest.fixture
def kr(keyrotor: Keyrotor, redis_server: RedisServer) -> Iterator[Keyrotor]:
    keyrotor.env["KEYROTOR_REDIS_URL"] = redis_server.url
    keyrotor.add_keys(*GOOD)
    yield keyrotor
    keyrotor.stop()  # before Redis stops: what the nodes say at their end is about the test, not the teardown


def test_a_key_invalidated_through_node_a_is_never_used_by_node_b(kr: Keyrotor, upstream: FakeUpstream):
    kr.add_keys(REVOKED)
    upstream.set_key(REVOKED, "invalid")
    key = kr.add_client("victim")
    nodes = Nodes(kr).start()

    # One request at a time through node A until one of them meets the revoked key (and is retried).
    for _ in range(20):
        assert send(nodes, 0, key) == [200]
        if REVOKED in upstream.keys_seen():
            break
    assert upstream.keys_seen().count(REVOKED) == 1
    time.sleep(PROPAGATION_BOUND)

    assert send(nodes, 1, key, 30) == [200] * 30  # node B: round robin would reach it every third request

    assert upstream.keys_seen().count(REVOKED) == 1  # node B never sent it


def test_an_rpm_limit_is_exact_across_both_nodes_under_parallel_bursts(kr: Keyrotor, upstream: FakeUpstream):
    key = kr.setup("clients", "add", "burst", "--rpm", "6").stdout.strip().splitlines()[-1]
    nodes = Nodes(kr).start()

    statuses = burst(nodes, key, 12)

    every = [s for per_node in statuses for s in per_node]
    assert every.count(200) == 6, statuses
    assert every.count(429) == 18, statuses
    assert len(upstream.received) == 6


def test_a_budget_spent_on_both_nodes_refuses_at_the_same_total(kr: Keyrotor, upstream: FakeUpstream):
    key = kr.setup("clients", "add", "budget", "--daily-tokens", "300").stdout.strip().splitlines()[-1]
    nodes = Nodes(kr).start()

    served = spend_until_refused(nodes, key)
    used = sum(r["total_tokens"] or 0 for r in kr.query("SELECT total_tokens FROM flows WHERE status = 200"))
    wait_for(lambda: kr.query("SELECT count(*) AS n FROM flows")[0]["n"] >= served + 3, what="every flow recorded")
    used = sum(r["total_tokens"] or 0 for r in kr.query("SELECT total_tokens FROM flows WHERE status = 200"))
    largest = max(r["total_tokens"] or 0 for r in kr.query("SELECT total_tokens FROM flows WHERE status = 200"))
    assert 300 <= used < 300 + largest  # refused once spent, overrun by at most the last request's worth
    assert served >= 4  # both nodes served some before it was spent
    # The lease holder copies the shared spend into the database, where the CLI and the UI read it.
    wait_for(
        lambda: (
            [r["value"] for r in kr.query("SELECT value FROM limit_counters WHERE name LIKE 'spend:%:tokens:day:%'")]
            == [used]
        ),
        what="the spend in the database",
    )


def test_workers_of_a_node_share_through_redis_too(kr: Keyrotor, upstream: FakeUpstream):
    key = kr.setup("clients", "add", "burst", "--rpm", "5").stdout.strip().splitlines()[-1]
    kr.start_proxy("--workers", "2")
    wait_for(lambda: kr.logs().count("listening at") >= 2, 60, what="both workers listening")
    nodes = Nodes(kr)
    nodes.ports.append(kr.proxy_port or 0)
    Nodes(kr).start(1)
    nodes.ports.append(kr.proxy_port or 0)

    statuses = burst(nodes, key, 10)  # fresh connections: spread over both workers of the first node

    assert sum(per_node.count(200) for per_node in statuses) == 5, statuses
    assert len(upstream.received) == 5
    wait_for(
        lambda: {row["worker"] for row in kr.query("SELECT worker FROM flows")} >= {0, 1},
        what="both workers of the first node served or refused some",
    )


def test_redis_restarted_mid_load_loses_no_request_and_limits_resume(
    kr: Keyrotor, upstream: FakeUpstream, redis_server: RedisServer
):
    key = kr.add_client("steady")
    local = kr.setup("clients", "add", "local", "--rpm", "3").stdout.strip().splitlines()[-1]
    shared = kr.setup("clients", "add", "shared", "--rpm", "4").stdout.strip().splitlines()[-1]
    nodes = Nodes(kr).start()
    statuses: list[int] = []
    stop = threading.Event()

    def load(node: int) -> None:
        while not stop.is_set():
            statuses.extend(send(nodes, node, key, 2))

    threads = [threading.Thread(target=load, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        redis_server.stop()
        wait_for(lambda: kr.logs().count("REDIS UNREACHABLE") >= 2, what="both nodes warn")
        # Meanwhile each node counts limits on its own: 3 a minute per node at most.
        during = burst(nodes, local, 6)
        assert all(per_node.count(200) <= 3 for per_node in during), during
        assert 3 <= sum(per_node.count(200) for per_node in during) <= 6, during
        time.sleep(0.5)
        redis_server.start()
        wait_for(lambda: kr.logs().count("answers again: ") >= 2, 15, what="both nodes rejoin Redis")
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert statuses and set(statuses) == {200}, [s for s in statuses if s != 200]
    assert kr.logs().count("REDIS UNREACHABLE") == 2  # once per node and outage, not per request
    # Coordination resumed: one count across both nodes again.
    after = burst(nodes, shared, 8)
    assert sum(per_node.count(200) for per_node in after) == 4, after


def test_redis_down_at_start_the_node_serves_and_warns(kr: Keyrotor, upstream: FakeUpstream, redis_server: RedisServer):
    redis_server.stop()
    key = kr.add_client("early")
    nodes = Nodes(kr).start(1)

    assert send(nodes, 0, key, 5) == [200] * 5
    assert kr.logs().count("REDIS UNREACHABLE") == 1
    assert f"127.0.0.1:{redis_server.port}" in kr.logs()

    kr.start_ui()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    metrics = httpx.get(f"{kr.ui_url}/metrics", headers=admin).text
    assert "keyrotor_redis_up 0" in metrics
    assert "keyrotor_redis_nodes_down 1" in metrics
    twin = httpx.get(f"{kr.ui_url}/api/dashboard", headers=admin).json()["redis"]
    assert twin["up"] is False and twin["nodes_down"] == 1 and "Connection refused" in twin["error"]
    page = httpx.Client(base_url=kr.ui_url, follow_redirects=False, timeout=10)
    assert page.post("/login", data={"admin_key": ADMIN_KEY}).status_code == 303
    notice = html.unescape(page.get("/dashboard").text)
    assert "Redis is unreachable since" in notice and "1 node serves on its local view" in notice

    redis_server.start()
    wait_for(lambda: "answers again: " in kr.logs(), 15, what="the node joins Redis")
    wait_for(
        lambda: (
            "keyrotor_redis_up 1"
            in httpx.get(f"{kr.ui_url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        ),
        10,
        what="the UI sees Redis up",
    )


def test_an_admin_change_reaches_both_nodes_through_redis(kr: Keyrotor, upstream: FakeUpstream):
    nodes = Nodes(kr).start()
    kr.add_client("first")  # an open port is not yet a running node: both have reloaded once they run
    wait_for(lambda: kr.logs().count("client keys loaded: 1 enabled") >= 2, what="both nodes running")
    key = kr.add_client("late")  # made after both nodes started: they hear of it through Redis
    time.sleep(PROPAGATION_BOUND)  # less than their poll's half second

    assert send(nodes, 0, key) == [200]
    assert send(nodes, 1, key) == [200]
    kr.setup("clients", "disable", "late")
    time.sleep(PROPAGATION_BOUND)
    assert send(nodes, 0, key) == [401]
    assert send(nodes, 1, key) == [401]


def test_the_redis_password_never_reaches_logs_or_process_arguments(
    keyrotor: Keyrotor, upstream: FakeUpstream, redis_server: RedisServer
):
    redis_server.stop()
    secret = "s3cret-redis-pass"
    keyrotor.env["KEYROTOR_REDIS_URL"] = f"redis://:{secret}@127.0.0.1:{redis_server.port}/0"
    keyrotor.add_keys(*GOOD)
    keyrotor.add_client("quiet")
    Nodes(keyrotor).start(1)
    assert "REDIS UNREACHABLE" in keyrotor.logs()
    assert secret not in keyrotor.logs()
    for process in keyrotor.processes:
        with open(f"/proc/{process.pid}/cmdline", "rb") as f:
            assert secret.encode() not in f.read()
