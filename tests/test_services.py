"""The real servers the multi-node tests use start, answer and stop (tests/services.py)."""

from __future__ import annotations

import psycopg
import pytest
import redis

from tests.services import PostgresServer, RedisServer


def test_postgres_gives_each_test_its_own_database(postgres_server: PostgresServer, postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
    other = postgres_server.database()
    with psycopg.connect(other) as conn, pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute("SELECT count(*) FROM t")


def test_redis_restarts_on_the_same_port_and_forgets(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.set("k", "v")
    assert client.get("k") == b"v"
    redis_server.restart()
    client = redis.Redis.from_url(redis_server.url)
    assert client.get("k") is None  # no persistence: a restart is a Redis that lost its state
