"""The audit log: every administrative act, who did it and from where, never a secret.

The storage functions that change what admins manage (keys, upstreams, groups, models,
clients, limits) call `record()` in their own transaction, so an act and its entry commit
together. Who is acting is set once per command or request with `acting()`: the CLI as
"cli", the UI as "ui-session" or "admin-api" with the caller's address. Changes made with
no actor set (the proxy's own re-validation, tests' fixtures) are not administrative acts
and are not logged.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from core.affinity import TenantRefusal

CLI, UI_SESSION, ADMIN_API = "cli", "ui-session", "admin-api"
PROXY = "proxy"  # what the proxy itself refused (a client naming another client's object)
SCHEDULER = "scheduler"  # what the UI runs on a schedule (trace probes)
ACTORS = (CLI, UI_SESSION, ADMIN_API, PROXY, SCHEDULER)
PAGE_LIMIT = 500


@dataclass(frozen=True)
class Actor:
    name: str  # one of ACTORS
    address: str | None = None


_actor: ContextVar[Actor | None] = ContextVar("keyrotor_audit_actor", default=None)


def set_actor(actor: Actor | None) -> None:
    _actor.set(actor)


def current_actor() -> Actor | None:
    return _actor.get()


@contextmanager
def acting(actor: Actor) -> Iterator[None]:
    token = _actor.set(actor)
    try:
        yield
    finally:
        _actor.reset(token)


def record(
    conn: sqlite3.Connection, action: str, target: Any = None, changes: dict | None = None, actor: Actor | None = None
) -> None:
    """One entry, in the caller's transaction; nothing when no actor is acting."""
    actor = actor or _actor.get()
    if actor is None:
        return
    conn.execute(
        "INSERT INTO audit_log (at, actor, address, action, target, changes) VALUES (?, ?, ?, ?, ?, ?)",
        (
            time.time(),
            actor.name,
            actor.address,
            action,
            None if target is None else str(target),
            json.dumps(changes or {}, sort_keys=True, default=str),
        ),
    )


def log_now(db_path, action: str, target: Any = None, changes: dict | None = None, actor: Actor | None = None) -> None:
    """One entry in a transaction of its own (logins, the admin key's rotation)."""
    from storage import db

    conn = db.connect(db_path)
    try:
        with conn:
            record(conn, action, target, changes, actor)
    finally:
        conn.close()


def record_refusal(conn: sqlite3.Connection, refusal: TenantRefusal) -> None:
    """A client named objects that are not its own (tenancy): who, which objects, on which request."""
    changes = {
        "client_id": refusal.client_id,
        "client": refusal.client_name,
        "objects": list(refusal.object_ids),
        "method": refusal.method,
        "path": refusal.path[:500],
        "flow_id": refusal.flow_id,
    }
    target = ",".join(refusal.object_ids)[:500]
    conn.execute(
        "INSERT INTO audit_log (at, actor, address, action, target, changes) VALUES (?, ?, ?, ?, ?, ?)",
        (refusal.at, PROXY, None, "objects.refused", target, json.dumps(changes, sort_keys=True)),
    )


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None  # a prefix: "keys" finds keys.add, keys.disable, …
    target: str | None = None
    since: float | None = None
    until: float | None = None


def entries(conn: sqlite3.Connection, f: AuditFilter = AuditFilter(), limit: int = 100) -> list[dict]:
    """Newest first."""
    where: list[str] = []
    params: list[str | float] = []
    if f.actor:
        where.append("actor = ?")
        params.append(f.actor)
    if f.action:
        where.append("action >= ? AND action < ?")
        params += [f.action, f.action + "\U0010ffff"]
    if f.target:
        where.append("target = ?")
        params.append(f.target)
    if f.since is not None:
        where.append("at >= ?")
        params.append(f.since)
    if f.until is not None:
        where.append("at < ?")
        params.append(f.until)
    sql = "SELECT id, at, actor, address, action, target, changes FROM audit_log"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY at DESC, id DESC LIMIT ?"
    params.append(max(1, min(limit, PAGE_LIMIT)))
    return [
        {
            "id": row["id"],
            "at": row["at"],
            "actor": row["actor"],
            "address": row["address"],
            "action": row["action"],
            "target": row["target"],
            "changes": json.loads(row["changes"] or "{}"),
        }
        for row in conn.execute(sql, params)
    ]


def purge(conn: sqlite3.Connection, older_than: float) -> int:
    """Retention: entries older than capture.keep_days go with the flows."""
    with conn:
        return conn.execute("DELETE FROM audit_log WHERE at < ?", (older_than,)).rowcount
