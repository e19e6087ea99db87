"""Several machines as docs/redis.md and docs/postgresql.md describe them: two nodes, each with its own
installation directory, on one PostgreSQL database (storage.url) and one Redis ([redis] url), in front of
the fake upstream, through the official openai client.

What must hold with both together, whichever node a request reaches: a client's RPM is exact across the
nodes; a key upstream refused through one node is not used by the other; a budget is one, and the
Redis lease holder copies its spend into PostgreSQL (where the CLI and the UI read it); every flow of
both nodes is recorded once in PostgreSQL and found in one UI; neither node writes a SQLite file; and
a Redis restart and a ten-second PostgreSQL outage under load fail no request and lose no flow.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import db, pg, redis_shared
from tests.conftest import Keyrotor, wait_for
from tests.fake_upstream import FakeUpstream
from tests.services import PostgresServer, RedisServer
from tests.test_postgresql_integration import SECRET, chat, listed, second_node
from tests.test_redis_integration import PROPAGATION_BOUND, Nodes, burst, send, spend_until_refused

GOOD = ["sk-good-pgredis-aaaaaaaaaaaaaaaaaaaa0001", "sk-good-pgredis-bbbbbbbbbbbbbbbbbbbb0002"]
REVOKED = "sk-good-pgredis-revokedxxxxxxxxxxxxx0003"
REJOINED = "answers again: "  # storage/redis_shared.py's log line when a node shares through Redis again
UNREACHABLE = "REDIS UNREACHABLE"


@pytest.fixture(autouse=True)
def _this_test_only() -> Iterator[None]:
    """kr.setup() runs the CLI in this process: its storage.url and Redis announcements end with the test."""
    yield
    db.use_postgres(None)
    db.revision_announcers.clear()
    redis_shared._announcing.clear()


@pytest.fixture
def other(keyrotor: Keyrotor, postgres_url: str, redis_server: RedisServer, tmp_path: Path) -> Iterator[Keyrotor]:
    """`keyrotor` on PostgreSQL and Redis, and another machine's node on the same database, Redis and secret."""
    keyrotor.env.update(KEYROTOR_STORAGE_URL=postgres_url, KEYROTOR_SECRET=SECRET, KEYROTOR_REDIS_URL=redis_server.url)
    node = second_node(keyrotor, tmp_path)
    yield node
    node.stop()


def start_both(keyrotor: Keyrotor, other: Keyrotor, *node_a: str) -> Nodes:
    keyrotor.start_proxy(*node_a)
    if node_a:
        wait_for(lambda: keyrotor.logs().count("listening at") >= 2, 60, what="both workers listening")
    nodes = Nodes(keyrotor)
    nodes.ports.append(keyrotor.proxy_port or 0)
    other.start_proxy()
    assert other.proxy_port is not None
    nodes.ports.append(other.proxy_port)
    return nodes


def rows(postgres_url: str, sql: str) -> list:
    conn = pg.connect(postgres_url)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_two_nodes_on_one_postgresql_and_one_redis_share_limits_keys_budgets_and_captures(
    keyrotor: Keyrotor, other: Keyrotor, upstream: FakeUpstream, postgres_url: str
):
    keyrotor.add_keys(*GOOD, REVOKED)
    upstream.set_key(REVOKED, "invalid")
    steady = keyrotor.add_client("steady")
    limited = keyrotor.setup("clients", "add", "limited", "--rpm", "6").stdout.strip().splitlines()[-1]
    budget = keyrotor.setup("clients", "add", "budget", "--daily-tokens", "300").stdout.strip().splitlines()[-1]
    nodes = start_both(keyrotor, other, "--workers", "2")  # node A's two workers are nodes of Redis too
    sent = 0
    # A key refused through node A is never sent by node B (first: a burst could meet it on both at once).
    for _ in range(20):
        assert send(nodes, 0, steady) == [200]
        sent += 1
        if REVOKED in upstream.keys_seen():
            break
    assert upstream.keys_seen().count(REVOKED) == 1
    time.sleep(PROPAGATION_BOUND)
    assert send(nodes, 1, steady, 30) == [200] * 30
    sent += 30
    assert upstream.keys_seen().count(REVOKED) == 1

    # RPM 6 across both nodes, 12 requests at each at once: exactly 6 through.
    statuses = burst(nodes, limited, 12)
    sent += 24
    assert sum(per_node.count(200) for per_node in statuses) == 6, statuses
    assert sum(per_node.count(429) for per_node in statuses) == 18, statuses

    # One budget across both nodes.
    served = spend_until_refused(nodes, budget)
    sent += served + 3
    assert served >= 4

    # A word of each node's own, found on node A's UI: it reads every node's flows.
    chat(nodes.url(0), steady, "aardvark through node a")
    chat(nodes.url(1), steady, "bumblebee through node b")
    sent += 2
    keyrotor.start_ui()
    for word in ("aardvark", "bumblebee"):
        found = wait_for(lambda word=word: listed(keyrotor.ui_url, q=word), what=f"the {word} flow in node A's UI")
        assert [f["path"] for f in found] == ["/v1/chat/completions"]

    # Every flow of both nodes, once, in PostgreSQL; the spend copied there by the lease holder.
    wait_for(lambda: rows(postgres_url, "SELECT count(*) FROM flows")[0][0] == sent, what=f"all {sent} flows")
    assert rows(postgres_url, "SELECT count(DISTINCT id) FROM flows")[0][0] == sent
    used = rows(
        postgres_url,
        "SELECT coalesce(sum(f.total_tokens), 0) FROM flows f JOIN clients c ON c.id = f.client_id"
        " WHERE c.name = 'budget' AND f.status = 200",
    )[0][0]
    assert used >= 300
    client_id = rows(postgres_url, "SELECT id FROM clients WHERE name = 'budget'")[0][0]
    spend = f"SELECT value FROM limit_counters WHERE name LIKE 'spend:{client_id}:tokens:day:%'"
    wait_for(
        lambda: [r[0] for r in rows(postgres_url, spend)] == [used],
        what="the budget's spend in PostgreSQL",
    )
    assert not (keyrotor.db_path.exists() or other.db_path.exists())  # no SQLite file on either machine
    workers = {r[0] for r in rows(postgres_url, "SELECT DISTINCT worker FROM flows WHERE worker IS NOT NULL")}
    assert workers == {0, 1}  # the bursts' fresh connections reached both of node A's workers
    for node in (keyrotor, other):
        assert node.logs().count(UNREACHABLE) == 0


def test_redis_restarted_then_postgresql_stopped_for_ten_seconds_under_load_fail_no_request_and_lose_no_flow(
    keyrotor: Keyrotor,
    other: Keyrotor,
    upstream: FakeUpstream,
    postgres_url: str,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
):
    keyrotor.add_keys(*GOOD)
    steady = keyrotor.add_client("steady")
    shared = keyrotor.setup("clients", "add", "shared", "--rpm", "4").stdout.strip().splitlines()[-1]
    nodes = start_both(keyrotor, other)
    statuses: list[int] = []
    stop = threading.Event()

    def load(node: int) -> None:
        while not stop.is_set():
            statuses.extend(send(nodes, node, steady, 2))
            time.sleep(0.02)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(statuses) >= 20, what="traffic before the outages")
        redis_server.stop()
        wait_for(lambda: all(UNREACHABLE in n.logs() for n in (keyrotor, other)), what="both nodes warn")
        time.sleep(0.5)
        redis_server.start()
        wait_for(lambda: all(n.logs().count(REJOINED) == 1 for n in (keyrotor, other)), 15, what="both rejoin")
        postgres_server.stop()
        try:
            before, stopped = len(statuses), time.monotonic()
            time.sleep(2)
            # Redis restarted empty while PostgreSQL is away: the totals to seed it from cannot be read, and
            # seeding it from nothing would forget what was spent, so the nodes stay on their local view.
            redis_server.restart(0.5)
            wait_for(lambda: all(n.logs().count(UNREACHABLE) == 2 for n in (keyrotor, other)), 15, what="warned")
            time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))  # PostgreSQL away for ten seconds
            during = len(statuses) - before
            assert all(n.logs().count(REJOINED) == 1 for n in (keyrotor, other))  # not back on an empty Redis
        finally:
            postgres_server.start()
        wait_for(lambda: all(n.logs().count(REJOINED) == 2 for n in (keyrotor, other)), 15, what="both rejoin again")
        wait_for(lambda: len(statuses) >= before + during + 20, what="traffic after the outages")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert statuses and set(statuses) == {200}, [s for s in statuses if s != 200]
    assert during > 20  # both nodes served while PostgreSQL was away
    sent = len(statuses)
    wait_for(lambda: rows(postgres_url, "SELECT count(*) FROM flows")[0][0] == sent, 30, what=f"all {sent} flows")
    assert rows(postgres_url, "SELECT count(DISTINCT id) FROM flows")[0][0] == sent
    # Coordination is whole again after both outages: one RPM across both nodes.
    after = burst(nodes, shared, 8)
    assert sum(per_node.count(200) for per_node in after) == 4, after
    for node in (keyrotor, other):
        assert "captured flows are lost" not in node.logs()
        assert node.logs().count(UNREACHABLE) == 2  # once per node and outage, not per request
