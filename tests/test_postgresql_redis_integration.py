"""Several machines as docs/redis.md and docs/postgresql.md describe them: two nodes, each with its own
installation directory, on one PostgreSQL database (storage.url) and one Redis ([redis] url), in front of
the fake upstream, through the official openai client.

What must hold with both together, whichever node a request reaches: a client's RPM is exact across the
nodes; a key upstream refused through one node is not used by the other; a budget is one, and the
Redis lease holder copies its spend into PostgreSQL (where the CLI and the UI read it); every flow of
both nodes is recorded once in PostgreSQL; and neither node writes a SQLite file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import db, pg, redis_shared
from tests.conftest import Keyrotor, wait_for
from tests.fake_upstream import FakeUpstream
from tests.services import RedisServer
from tests.test_postgresql_integration import SECRET, second_node
from tests.test_redis_integration import PROPAGATION_BOUND, Nodes, burst, send

GOOD = ["sk-good-pgredis-aaaaaaaaaaaaaaaaaaaa0001", "sk-good-pgredis-bbbbbbbbbbbbbbbbbbbb0002"]
REVOKED = "sk-good-pgredis-revokedxxxxxxxxxxxxx0003"


@pytest.fixture(autouse=True)
def _this_test_only() -> Iterator[None]:
    """kr.setup() runs the CLI in this process: its storage.url and Redis announcements end with the test."""
    yield
    db.use_postgres(None)
    db.revision_announcers.clear()
    redis_shared._announcing.clear()


def rows(postgres_url: str, sql: str) -> list:
    conn = pg.connect(postgres_url)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_two_nodes_on_one_postgresql_and_one_redis_share_limits_keys_budgets_and_captures(
    keyrotor: Keyrotor, upstream: FakeUpstream, postgres_url: str, redis_server: RedisServer, tmp_path: Path
):
    keyrotor.env.update(KEYROTOR_STORAGE_URL=postgres_url, KEYROTOR_SECRET=SECRET, KEYROTOR_REDIS_URL=redis_server.url)
    keyrotor.add_keys(*GOOD, REVOKED)
    upstream.set_key(REVOKED, "invalid")
    steady = keyrotor.add_client("steady")
    limited = keyrotor.setup("clients", "add", "limited", "--rpm", "6").stdout.strip().splitlines()[-1]
    budget = keyrotor.setup("clients", "add", "budget", "--daily-tokens", "300").stdout.strip().splitlines()[-1]
    other = second_node(keyrotor, tmp_path)  # another machine's directory, same database, Redis and secret
    nodes = Nodes(keyrotor).start(1)
    other.start_proxy()
    assert other.proxy_port is not None
    nodes.ports.append(other.proxy_port)
    sent = 0
    try:
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
        served = 0
        for i in range(60):
            status = send(nodes, i % 2, budget, max_tokens=5)[0]
            sent += 1
            if status != 200:
                assert status == 429
                break
            served += 1
        else:
            pytest.fail("the budget never refused")
        assert send(nodes, 0, budget, max_tokens=5) == [429]
        assert send(nodes, 1, budget, max_tokens=5) == [429]
        sent += 2
        assert served >= 4

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
        for node in (keyrotor, other):
            assert node.logs().count("REDIS UNREACHABLE") == 0
    finally:
        other.stop()
