"""Clients and the client keys they own. Only a key's sha256 is stored.

A client (a person, team or service) holds one or more keys; its limits and usage are the
client's, so a key can be added or revoked without losing its history. Every change bumps
the "clients" revision, which running proxies poll, and is written to the audit log.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from core.limits import LIST_FIELDS, NO_LIMITS, ClientPolicy, policy_with
from core.models import Client
from storage import audit, flows
from storage.db import bump_revision, inserted_id
from storage.secrets import hash_client_key, new_client_key


class ClientExists(Exception):
    pass


class ClientNotFound(Exception):
    pass


def policy_json(policy: ClientPolicy) -> str:
    """The limits that are set, as stored."""
    values = {
        k: list(v) if k in LIST_FIELDS else v for k, v in dataclasses.asdict(policy).items() if v not in (None, (), [])
    }
    return json.dumps(values, sort_keys=True)


def policy_of(text: str | None) -> ClientPolicy:
    values = json.loads(text or "{}")
    known = {f.name for f in dataclasses.fields(ClientPolicy)}
    limits: dict[str, Any] = {k: tuple(v) if k in LIST_FIELDS else v for k, v in values.items() if k in known}
    return ClientPolicy(**limits)


def _changed(before: ClientPolicy, after: ClientPolicy) -> dict:
    return {
        f.name: {"from": _plain(getattr(before, f.name)), "to": _plain(getattr(after, f.name))}
        for f in dataclasses.fields(ClientPolicy)
        if getattr(before, f.name) != getattr(after, f.name)
    }


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _insert_key(conn: sqlite3.Connection, client_id: int, name: str) -> tuple[int, str]:
    key = new_client_key()
    cursor = conn.execute(
        "INSERT INTO client_keys (name, key_hash, last4, enabled, created_at, client_id) VALUES (?, ?, ?, 1, ?, ?)",
        (name, hash_client_key(key), key[-4:], time.time(), client_id),
    )
    return inserted_id(cursor), key


def create_client(conn: sqlite3.Connection, name: str, policy: ClientPolicy = NO_LIMITS) -> str:
    """Create client `name` with its first key and return that key; it cannot be shown again."""
    try:
        with conn:
            cursor = conn.execute(
                "INSERT INTO clients (name, enabled, limits, created_at) VALUES (?, 1, ?, ?)",
                (name, policy_json(policy), time.time()),
            )
            client_id = inserted_id(cursor)
            key_id, key = _insert_key(conn, client_id, name)
            audit.record(conn, "clients.add", name, {"id": client_id, "key_id": key_id, **_changed(NO_LIMITS, policy)})
            bump_revision(conn, "clients")
    except sqlite3.IntegrityError:
        raise ClientExists(f"a client named {name!r} already exists") from None
    return key


def client_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM clients WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise ClientNotFound(f"no client named {name!r}")
    return row


def client_by_id(conn: sqlite3.Connection, client_id: int) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM clients WHERE id = ?", (client_id,)).fetchone()


def set_limits(conn: sqlite3.Connection, name: str, changes: dict[str, str | None]) -> ClientPolicy:
    """Change some of a client's limits (given as text; 'none' clears one); raises LimitError, ClientNotFound."""
    row = client_row(conn, name)
    before = policy_of(row["limits"])
    after = policy_with(before, changes)
    with conn:
        conn.execute(
            "UPDATE clients SET limits = ?, changed_at = ? WHERE id = ?", (policy_json(after), time.time(), row["id"])
        )
        audit.record(conn, "clients.set", name, {"id": row["id"], **_changed(before, after)})
        bump_revision(conn, "clients")
    return after


def set_legacy_objects(conn: sqlite3.Connection, name: str, allowed: bool) -> None:
    """Whether client `name` may reach objects that belong to no client (made before tenancy, or
    upstream directly); raises ClientNotFound."""
    row = client_row(conn, name)
    before = bool(row["legacy_objects"])
    if before == allowed:
        return
    with conn:
        conn.execute(
            "UPDATE clients SET legacy_objects = ?, changed_at = ? WHERE id = ?", (int(allowed), time.time(), row["id"])
        )
        audit.record(conn, "clients.set", name, {"id": row["id"], "legacy_objects": {"from": before, "to": allowed}})
        bump_revision(conn, "clients")


def add_key(conn: sqlite3.Connection, name: str) -> tuple[int, str]:
    """A new key for client `name`: (its id, the key, shown only now)."""
    row = client_row(conn, name)
    with conn:
        key_id, key = _insert_key(conn, row["id"], name)
        audit.record(conn, "clients.keys.add", name, {"id": row["id"], "key_id": key_id, "last4": key[-4:]})
        bump_revision(conn, "clients")
    return key_id, key


def list_keys(conn: sqlite3.Connection, name: str) -> list[sqlite3.Row]:
    row = client_row(conn, name)
    return keys_of(conn, row["id"])


def keys_of(conn: sqlite3.Connection, client_id: int) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT id, last4, enabled, revoked_at, requests, prompt_tokens, completion_tokens, cost, last_used_at,"
        " created_at FROM client_keys WHERE client_id = ? ORDER BY id LIMIT 1000",
        (client_id,),
    ).fetchall()


def revoke_key(conn: sqlite3.Connection, name: str, key_id: int) -> int:
    """The key stops working within a second; its usage stays with the client."""
    row = client_row(conn, name)
    with conn:
        count = conn.execute(
            "UPDATE client_keys SET enabled = 0, revoked_at = ? WHERE id = ? AND client_id = ? AND revoked_at IS NULL",
            (time.time(), key_id, row["id"]),
        ).rowcount
        if count:
            audit.record(conn, "clients.keys.revoke", name, {"id": row["id"], "key_id": key_id})
            bump_revision(conn, "clients")
    return count


_LIST = (
    "SELECT c.id, c.name, c.enabled, c.limits, c.legacy_objects, c.created_at,"
    " (SELECT last4 FROM client_keys k WHERE k.client_id = c.id AND k.revoked_at IS NULL ORDER BY k.id LIMIT 1)"
    " AS last4,"
    " (SELECT count(*) FROM client_keys k WHERE k.client_id = c.id AND k.revoked_at IS NULL) AS keys,"
    " coalesce(sum(k.requests), 0) AS requests, coalesce(sum(k.prompt_tokens), 0) AS prompt_tokens,"
    " coalesce(sum(k.completion_tokens), 0) AS completion_tokens, coalesce(sum(k.cost), 0) AS cost,"
    " max(k.last_used_at) AS last_used_at"
    " FROM clients c LEFT JOIN client_keys k ON k.client_id = c.id"
)


def list_clients(conn: sqlite3.Connection, limit: int = 1000) -> list[sqlite3.Row]:
    """Clients with their usage summed over their keys (revoked ones too)."""
    return conn.execute(f"{_LIST} GROUP BY c.id ORDER BY c.id LIMIT ?", (limit,)).fetchall()


def summary_of(conn: sqlite3.Connection, client_id: int) -> sqlite3.Row | None:
    return conn.execute(f"{_LIST} WHERE c.id = ? GROUP BY c.id", (client_id,)).fetchone()


def set_enabled(conn: sqlite3.Connection, name: str, enabled: bool) -> int:
    row = conn.execute("SELECT id FROM clients WHERE name = ?", (name,)).fetchone()
    return set_enabled_by_id(conn, row["id"], enabled) if row else 0


def set_enabled_by_id(conn: sqlite3.Connection, client_id: int, enabled: bool) -> int:
    with conn:
        count = conn.execute("UPDATE clients SET enabled = ? WHERE id = ?", (int(enabled), client_id)).rowcount
        if count:
            audit.record(
                conn, "clients.enable" if enabled else "clients.disable", _name(conn, client_id), {"id": client_id}
            )
            bump_revision(conn, "clients")
    return count


def delete_client(conn: sqlite3.Connection, client_id: int) -> int:
    """The client's keys stop working within a second; its flows keep the ids."""
    with conn:
        name = _name(conn, client_id)
        conn.execute("DELETE FROM client_keys WHERE client_id = ?", (client_id,))
        count = conn.execute("DELETE FROM clients WHERE id = ?", (client_id,)).rowcount
        if count:
            audit.record(conn, "clients.delete", name, {"id": client_id})
            bump_revision(conn, "clients")
    return count


def _name(conn: sqlite3.Connection, client_id: int) -> str | None:
    row = conn.execute("SELECT name FROM clients WHERE id = ?", (client_id,)).fetchone()
    return row[0] if row else None


def load_enabled(conn: sqlite3.Connection) -> dict[str, tuple[Client, int]]:
    """key hash → (client, key id), for the proxy's in-memory lookup: enabled clients' keys that are not revoked."""
    clients: dict[int, Client] = {}
    found: dict[str, tuple[Client, int]] = {}
    for row in conn.execute(
        "SELECT k.id AS key_id, k.key_hash, c.id, c.name, c.limits, c.legacy_objects"
        " FROM client_keys k JOIN clients c ON c.id = k.client_id"
        " WHERE k.enabled = 1 AND k.revoked_at IS NULL AND c.enabled = 1"
    ):
        client = clients.get(row["id"])
        if client is None:
            client = clients[row["id"]] = Client(
                id=row["id"],
                name=row["name"],
                policy=policy_of(row["limits"]),
                legacy_objects=bool(row["legacy_objects"]),
            )
        found[row["key_hash"]] = (client, row["key_id"])
    return found


def names_of(conn: sqlite3.Connection, client_ids: Iterable[int]) -> dict[int, str]:
    """Client key id → its client's name, for the keys a page shows; deleted ones are missing."""
    ids = sorted({i for i in client_ids if i is not None})[:1000]
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    return dict(conn.execute(f"SELECT id, name FROM client_keys WHERE id IN ({marks})", ids).fetchall())


def recent_flows(conn: sqlite3.Connection, client_id: int, limit: int = 20) -> list[sqlite3.Row]:
    """A client's latest flows, for its detail page (the flows filter's rules: rows before v9 too)."""
    return flows.search_flows(
        conn,
        flows.FlowFilter(client_id=client_id),
        max(1, min(limit, 200)),
        columns="id, flow_id, started_at, method, path, status, model, total_tokens, cost, refusal, error",
    )


class SqliteClientStore:
    """core.ports.ClientStore over one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def load_enabled(self) -> dict[str, tuple[Client, int]]:
        return load_enabled(self.conn)
