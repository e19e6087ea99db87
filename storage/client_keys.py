"""Client (proxy) keys that keyrotor issues. Only their sha256 is stored."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable

from core.models import Client
from storage.db import bump_revision
from storage.secrets import hash_client_key, new_client_key


class ClientExists(Exception):
    pass


def create_client(conn: sqlite3.Connection, name: str) -> str:
    """Issue a key for `name` and return it; it cannot be shown again."""
    key = new_client_key()
    try:
        with conn:
            conn.execute(
                "INSERT INTO client_keys (name, key_hash, last4, enabled, created_at) VALUES (?, ?, ?, 1, ?)",
                (name, hash_client_key(key), key[-4:], time.time()),
            )
            bump_revision(conn, "clients")
    except sqlite3.IntegrityError:
        raise ClientExists(f"a client named {name!r} already exists") from None
    return key


def list_clients(conn: sqlite3.Connection, limit: int = 1000) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT id, name, last4, enabled, requests, prompt_tokens, completion_tokens, cost, last_used_at,"
        " created_at FROM client_keys ORDER BY id LIMIT ?",
        (limit,),
    ).fetchall()


def set_enabled(conn: sqlite3.Connection, name: str, enabled: bool) -> int:
    with conn:
        count = conn.execute("UPDATE client_keys SET enabled = ? WHERE name = ?", (int(enabled), name)).rowcount
        if count:
            bump_revision(conn, "clients")
    return count


def set_enabled_by_id(conn: sqlite3.Connection, client_id: int, enabled: bool) -> int:
    with conn:
        count = conn.execute("UPDATE client_keys SET enabled = ? WHERE id = ?", (int(enabled), client_id)).rowcount
        if count:
            bump_revision(conn, "clients")
    return count


def delete_client(conn: sqlite3.Connection, client_id: int) -> int:
    """The key stops working within a second; its flows keep the id."""
    with conn:
        count = conn.execute("DELETE FROM client_keys WHERE id = ?", (client_id,)).rowcount
        if count:
            bump_revision(conn, "clients")
    return count


def load_enabled(conn: sqlite3.Connection) -> dict[str, Client]:
    """key hash → client, for the proxy's in-memory lookup."""
    return {
        row["key_hash"]: Client(id=row["id"], name=row["name"])
        for row in conn.execute("SELECT id, name, key_hash FROM client_keys WHERE enabled = 1")
    }


def names_of(conn: sqlite3.Connection, client_ids: Iterable[int]) -> dict[int, str]:
    """id → name for the clients a page shows; deleted clients are missing."""
    ids = sorted({i for i in client_ids if i is not None})[:1000]
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    return dict(conn.execute(f"SELECT id, name FROM client_keys WHERE id IN ({marks})", ids).fetchall())
