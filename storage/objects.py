"""Object ownership (key affinity): which upstream key made which object, and each flow's objects.

Written by the writer thread only (`record_in_transaction`), read by the proxy a few new
rows at a time (`owners_since`) and by the UI.
"""

from __future__ import annotations

import sqlite3
import time

from core.affinity import Ownership
from storage import db

OBJECTS = "objects"  # the revision bumped when new owners are stored


def record_in_transaction(conn: sqlite3.Connection, learnt: list[Ownership]) -> None:
    """Store what answers taught; the first key seen with an object stays its owner."""
    now = time.time()
    owners = [
        (o.id, o.kind, item.key_id, item.flow_id, now, item.client_of(o.id)) for item in learnt for o in item.owned
    ]
    before = conn.total_changes
    conn.executemany(
        "INSERT INTO object_owners (object_id, kind, upstream_key_id, flow_id, created_at, client_id)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(object_id) DO NOTHING",
        owners,
    )
    added = conn.total_changes - before
    links = [(item.flow_id, o.id, "created") for item in learnt for o in item.created]
    links += [(item.flow_id, object_id, "used") for item in learnt for object_id in item.used]
    conn.executemany(
        "INSERT INTO flow_objects (flow_id, object_id, role) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", links
    )
    if added:
        db.bump_revision(conn, OBJECTS)


def owners_since(conn: sqlite3.Connection, after_rowid: int) -> tuple[dict[str, int], int]:
    """Owners stored after `after_rowid` (object id → key id), and the last rowid read."""
    rows = conn.execute(
        "SELECT rowid, object_id, upstream_key_id FROM object_owners WHERE rowid > ? ORDER BY rowid", (after_rowid,)
    ).fetchall()
    if not rows:
        return {}, after_rowid
    return {row[1]: row[2] for row in rows}, rows[-1][0]


def clients_since(conn: sqlite3.Connection, after_rowid: int) -> dict[str, int]:
    """The clients of the objects stored after `after_rowid` that have one (object id → client id)."""
    rows = conn.execute(
        "SELECT object_id, client_id FROM object_owners WHERE rowid > ? AND client_id IS NOT NULL ORDER BY rowid",
        (after_rowid,),
    ).fetchall()
    return {row[0]: row[1] for row in rows}


def counts_by_client(conn: sqlite3.Connection) -> dict[int | None, int]:
    """How many objects each client made (None: objects of no client)."""
    rows = conn.execute("SELECT client_id, count(*) FROM object_owners GROUP BY client_id").fetchall()
    return {row[0]: row[1] for row in rows}


def objects_of_client(conn: sqlite3.Connection, client_id: int, limit: int = 200) -> list[dict]:
    """The newest objects a client made, with their kind and key."""
    rows = conn.execute(
        "SELECT object_id, kind, upstream_key_id, flow_id, created_at FROM object_owners WHERE client_id = ?"
        " ORDER BY created_at DESC, rowid DESC LIMIT ?",
        (client_id, max(1, min(limit, 1000))),
    ).fetchall()
    return [
        {"id": r[0], "kind": r[1], "owner_key_id": r[2], "flow_id": r[3], "created_at": r[4], "client_id": client_id}
        for r in rows
    ]


def counts_by_key(conn: sqlite3.Connection) -> dict[int, int]:
    """How many objects each upstream key owns."""
    rows = conn.execute("SELECT upstream_key_id, count(*) FROM object_owners GROUP BY upstream_key_id").fetchall()
    return {row[0]: row[1] for row in rows}


def count_of_key(conn: sqlite3.Connection, key_id: int) -> int:
    return conn.execute("SELECT count(*) FROM object_owners WHERE upstream_key_id = ?", (key_id,)).fetchone()[0]


def objects_of_flow(conn: sqlite3.Connection, flow_id: str) -> list[dict]:
    """The objects a flow created or used, with their kind and owner where known."""
    rows = conn.execute(
        "SELECT f.object_id, f.role, o.kind, o.upstream_key_id, o.client_id, c.name FROM flow_objects f"
        " LEFT JOIN object_owners o ON o.object_id = f.object_id LEFT JOIN clients c ON c.id = o.client_id"
        " WHERE f.flow_id = ? ORDER BY f.role, f.object_id LIMIT 200",
        (flow_id,),
    ).fetchall()
    return [
        {"id": r[0], "role": r[1], "kind": r[2], "owner_key_id": r[3], "client_id": r[4], "client_name": r[5]}
        for r in rows
    ]


class SqliteObjectOwners:
    """core.ports.ObjectOwners over one connection: positions are the table's rowids."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def owners_since(self, after: int) -> tuple[dict[str, int], int]:
        return owners_since(self.conn, after)

    def clients_since(self, after: int) -> dict[str, int]:
        return clients_since(self.conn, after)
