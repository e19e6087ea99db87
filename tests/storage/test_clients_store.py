"""Clients, their keys and limits in SQLite; counters saved and restored; the v8 migration."""

from __future__ import annotations

import sqlite3
import time

import pytest

from core.limits import ClientPolicy, spend_name
from storage import client_keys, conversion, counters, db, flows, schema
from storage.flows import FlowFilter
from storage.secrets import hash_client_key


def test_a_client_owns_keys_and_its_limits(database):
    conn = db.connect(database)
    first = client_keys.create_client(conn, "team", ClientPolicy(rpm=5))
    key_id, second = client_keys.add_key(conn, "team")
    loaded = client_keys.load_enabled(conn)
    (client, first_id), (same, _) = loaded[hash_client_key(first)], loaded[hash_client_key(second)]
    assert client == same and client.policy == ClientPolicy(rpm=5)
    assert client_keys.set_limits(conn, "team", {"rpm": "none", "models": "gpt-4o*"}) == ClientPolicy(
        models=("gpt-4o*",)
    )
    assert client_keys.revoke_key(conn, "team", first_id) == 1
    assert client_keys.revoke_key(conn, "team", first_id) == 0
    assert set(client_keys.load_enabled(conn)) == {hash_client_key(second)}
    client_keys.set_enabled(conn, "team", False)
    assert client_keys.load_enabled(conn) == {}
    row = client_keys.list_clients(conn)[0]
    assert (row["name"], row["keys"], row["enabled"]) == ("team", 1, 0)
    with pytest.raises(client_keys.ClientNotFound):
        client_keys.add_key(conn, "nobody")
    with pytest.raises(client_keys.ClientExists):
        client_keys.create_client(conn, "team")


def test_counters_are_saved_and_a_new_process_starts_from_them(database):
    now = time.time()
    saved = counters.SqliteCounters(database)
    saved.moving_add("rpm:1", 1, now - 30)
    entry = saved.moving_add("tpm:1", 500, now - 10)
    saved.moving_adjust("tpm:1", entry, 42)
    saved.period_add(spend_name(1, "tokens", "day", now), 42)
    saved.gauge_add("parallel:1", 1)
    conn = db.connect(database)
    saved.flush(conn)
    restored = counters.SqliteCounters(database)
    # Restored by the second: each entry leaves the window at the end of the second it came in.
    assert restored.moving_total("rpm:1", 60, now) == (1, int(now - 30) + 1)
    assert restored.moving_total("tpm:1", 60, now)[0] == 42
    assert restored.period_total(spend_name(1, "tokens", "day", now)) == 42
    assert restored.gauge("parallel:1") == 0  # requests in flight did not survive the restart
    assert counters.clients_spend(conn, [1, 2], now)[1]["day_tokens"] == 42
    assert counters.clients_spend(conn, [1, 2], now)[2]["month_usd"] == 0


def test_existing_client_keys_become_clients_of_their_own(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA user_version = 0")
    import sqlite_utils

    old = sqlite_utils.Database(conn)
    before_clients = schema.MIGRATIONS.index(schema._v9_clients_limits_audit)  # wherever a merge puts it
    for number, migration in enumerate(schema.MIGRATIONS[:before_clients], start=1):
        with conn:
            migration(old)
            conn.execute(f"PRAGMA user_version = {number}")
    with conn:
        for name in ("alice", "bob"):
            conn.execute(
                "INSERT INTO client_keys (name, key_hash, last4, enabled, created_at) VALUES (?, ?, 'abcd', ?, 0)",
                (name, hash_client_key(f"kr-{name}"), int(name == "alice")),
            )
        conn.execute(
            "INSERT INTO flows (flow_id, started_at, method, path, client_key_id) VALUES ('f', 0, 'GET', '/v1/models', 2)"
        )
    conn.close()
    db.ensure_database(path)
    conn = db.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(schema.MIGRATIONS)
    clients = {r["name"]: r for r in client_keys.list_clients(conn)}
    assert (clients["alice"]["id"], clients["alice"]["enabled"], clients["alice"]["keys"]) == (1, 1, 1)
    assert (clients["bob"]["id"], clients["bob"]["enabled"]) == (2, 0)
    loaded = client_keys.load_enabled(conn)
    assert [c.name for c, _ in loaded.values()] == ["alice"]
    # Bob's history is bob's: found by his client id before its row is converted, and after.
    assert [r["flow_id"] for r in flows.search_flows(conn, FlowFilter(client_id=2))] == ["f"]
    assert flows.search_flows(conn, FlowFilter(client_id=1)) == []
    assert [r["flow_id"] for r in client_keys.recent_flows(conn, 2)] == ["f"]  # on bob's page too
    assert [r["flow_id"] for r in flows.search_flows(conn, FlowFilter(client_id=2, q="models"))] == ["f"]
    assert conn.execute("SELECT client_id FROM flows").fetchone()[0] is None  # no UPDATE of every flow
    while conversion.convert_chunk(conn, flows.FlowPacker()):
        pass
    assert conn.execute("SELECT client_id FROM flows").fetchone()[0] == 2
    assert [r["flow_id"] for r in flows.search_flows(conn, FlowFilter(client_id=2))] == ["f"]
    client_keys.add_key(conn, "alice")  # two keys of one client: names are no longer unique
