"""Per-key usage that insert_batch adds up: requests, tokens, estimated cost, last use."""

from __future__ import annotations

import pytest

from core.records import FlowRecord
from storage import client_keys, flows, secrets, upstream_keys
from storage.upstream_keys import SqliteKeyStore
from usecases.keys import add_keys

T0 = 1_800_000_000.0


def row(n: int, **overrides) -> FlowRecord:
    base = {
        "flow_id": f"f{n}",
        "started_at": T0 + n,
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "model": "gpt-4o-mini",
        "upstream_key_id": 1,
        "client_key_id": 1,
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "cost": 0.0012,
    }
    return FlowRecord(**(base | overrides))


@pytest.fixture
def conn(conn, database):
    """tests/conftest.py's connection, with two keys and a client in the database."""
    add_keys(SqliteKeyStore(conn, secrets.key_cipher(database)), ["sk-" + "a" * 40, "sk-" + "b" * 40])
    client_keys.create_client(conn, "alice")
    return conn


def test_cost_adds_up_on_both_key_tables_across_batches(conn):
    with conn:
        flows.insert_batch(conn, [row(1), row(2, cost=0.5, upstream_key_id=2)])
    with conn:
        # Unknown models and failed requests have no cost; they still count as requests.
        flows.insert_batch(
            conn,
            [
                row(3, model="mystery", cost=None),
                row(4, status=429, cost=None, prompt_tokens=None, completion_tokens=None),
            ],
        )
    keys = {r["id"]: r for r in upstream_keys.list_keys(conn)}
    assert (keys[1]["requests"], keys[1]["prompt_tokens"], keys[1]["completion_tokens"]) == (3, 200, 40)
    assert keys[1]["cost"] == pytest.approx(0.0012)
    assert (keys[2]["requests"], keys[2]["cost"]) == (1, pytest.approx(0.5))
    (alice,) = client_keys.list_clients(conn)
    assert (alice["requests"], alice["cost"], alice["last_used_at"]) == (4, pytest.approx(0.5012), T0 + 4)
    stored = [r[0] for r in conn.execute("SELECT cost FROM flows ORDER BY id")]
    assert stored == [pytest.approx(0.0012), pytest.approx(0.5), None, None]
