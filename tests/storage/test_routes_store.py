"""Upstreams, groups and models in storage; a database from before them keeps every key, state and flow."""

from __future__ import annotations

import pytest

from core.keys import NewKey
from core.records import FlowRecord
from core.routing import Dialect, RouteTable
from storage import db, routes, schema, secrets, upstream_keys
from tests.conftest import insert_into_old_schema


def test_a_database_from_before_upstreams_keeps_every_key_state_and_flow(tmp_path, monkeypatch):
    monkeypatch.delenv("KEYROTOR_SECRET", raising=False)
    path = tmp_path / "old.db"
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:6])  # the schema the previous release made
    db.ensure_database(path)
    conn = db.connect(path)
    cipher = secrets.key_cipher(path)
    with conn:
        for n, (state, until) in enumerate([("active", None), ("invalid", None), ("cooling", 2e9), ("disabled", None)]):
            value = f"sk-old-key-{n:030d}"
            conn.execute(
                "INSERT INTO upstream_keys (fingerprint, secret, last4, state, state_reason, cooldown_until,"
                " requests, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                (cipher.fingerprint(value), cipher.encrypt(value), value[-4:], state, f"was {state}", until, n * 10),
            )
        records = [
            FlowRecord(flow_id=f"f{i}", started_at=1e9 + i, method="POST", path="/v1/x", status=200, upstream_key_id=1)
            for i in range(5)
        ]
        insert_into_old_schema(conn, records)
    before = [
        tuple(r) for r in conn.execute("SELECT id, state, state_reason, cooldown_until, requests FROM upstream_keys")
    ]
    monkeypatch.undo()
    schema.migrate(conn)

    after = [
        tuple(r) for r in conn.execute("SELECT id, state, state_reason, cooldown_until, requests FROM upstream_keys")
    ]
    assert after == before
    default = routes.group_id_of(conn, "default/default")
    assert {r[0] for r in conn.execute("SELECT group_id FROM upstream_keys")} == {default}
    assert conn.execute("SELECT count(*) FROM flows").fetchone()[0] == 5
    (upstream,) = routes.list_upstreams(conn)
    assert (upstream["name"], upstream["base_url"], upstream["dialect"]) == ("default", None, "openai")
    groups, fallbacks = routes.load_routes(conn)
    assert RouteTable(groups, fallbacks).trivial  # a user who never adds an upstream sees no change
    assert [k.group_id for k in upstream_keys.load_pool(conn, cipher)] == [default] * 4
    conn.close()


def test_groups_models_and_fallbacks_make_the_route_table(conn):
    routes.add_upstream(conn, "az", "https://res.openai.azure.com", Dialect.AZURE, "2024-10-21")
    group = routes.add_group(conn, "az/prod", priority=5, weight=2)
    routes.add_model(conn, group, "gpt-4o", "prod-gpt4o")
    routes.add_model(conn, group, "gpt-4o", "prod-gpt4o-v2")  # a second add renames it upstream
    routes.set_fallbacks(conn, "o1", ["gpt-4o", "gpt-4o"])
    groups, fallbacks = routes.load_routes(conn)
    table = RouteTable(groups, fallbacks)
    assert [(c.group.label, c.upstream_model) for c in table.candidates("gpt-4o")] == [
        ("az/prod", "prod-gpt4o-v2"),  # default/default lists no model: it serves only those no group lists
    ]
    assert [c.group.label for c in table.candidates("gpt-4o-mini")] == ["default/default"]
    assert fallbacks == {"o1": ["gpt-4o"]}
    routes.set_fallbacks(conn, "o1", [])
    assert routes.fallbacks(conn) == {}


def test_fetched_models_replace_the_last_fetch_and_keep_manual_ones(conn):
    group = routes.group_id_of(conn, "default/default")
    routes.add_model(conn, group, "mine", None)
    assert routes.store_fetched_models(conn, group, ["a", "b"]) == (2, 0)
    assert routes.store_fetched_models(conn, group, ["b", "c"]) == (1, 1)
    assert sorted(r["model"] for r in routes.list_models(conn, group)) == ["b", "c", "mine"]


def test_names_and_shapes_are_checked(conn):
    with pytest.raises(routes.Conflict):
        routes.add_upstream(conn, "default", None, Dialect.OPENAI, None)
    with pytest.raises(ValueError, match="UPSTREAM/GROUP"):
        routes.add_group(conn, "no-slash")
    with pytest.raises(routes.NotFound):
        routes.add_group(conn, "nosuch/x")
    with pytest.raises(ValueError, match="own fallback"):
        routes.set_fallbacks(conn, "a", ["a"])


def test_deleting_a_group_deletes_its_keys_and_the_proxy_hears_of_it(conn, database):
    routes.add_upstream(conn, "relay", "https://relay.example/v1", Dialect.OPENAI, None)
    group = routes.add_group(conn, "relay/cheap")
    upstream_keys.insert_keys(conn, secrets.key_cipher(database), [NewKey("sk-relay-" + "a" * 30)], group)
    before = (db.read_revision(conn, "keys"), db.read_revision(conn, routes.ROUTES))
    assert routes.delete_group(conn, group) == 1
    assert conn.execute("SELECT count(*) FROM upstream_keys WHERE group_id = ?", (group,)).fetchone()[0] == 0
    after = (db.read_revision(conn, "keys"), db.read_revision(conn, routes.ROUTES))
    assert after[0] > before[0] and after[1] > before[1]
