"""Upstreams, their groups, each group's models and the models' fallbacks.

Every change bumps the "routes" revision, so running proxies rebuild their route table
within a second. Deleting an upstream deletes its groups; deleting a group deletes its
keys and models (flows keep their ids).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable

from core.routing import DEFAULT, Dialect, Group, Upstream
from storage import audit
from storage.db import bump_revision, inserted_id

ROUTES = "routes"


class NotFound(LookupError):
    """No such upstream, group or model; the message names it."""


class Conflict(ValueError):
    """The name is taken, or the change would leave something unusable; the message says which."""


def _changed(conn: sqlite3.Connection) -> None:
    bump_revision(conn, ROUTES)


# --------------------------------------------------------------------------- upstreams


def add_upstream(
    conn: sqlite3.Connection, name: str, base_url: str | None, dialect: Dialect, api_version: str | None
) -> int:
    try:
        with conn:
            cursor = conn.execute(
                "INSERT INTO upstreams (name, base_url, dialect, api_version, enabled, created_at)"
                " VALUES (?, ?, ?, ?, 1, ?)",
                (name, base_url, dialect, api_version, time.time()),
            )
            audit.record(
                conn, "upstreams.add", name, {"base_url": base_url, "dialect": str(dialect), "api_version": api_version}
            )
            _changed(conn)
    except sqlite3.IntegrityError:
        raise Conflict(f"an upstream named {name!r} already exists") from None
    return inserted_id(cursor)


def update_upstream(conn: sqlite3.Connection, name: str, **changes) -> None:
    """Change base_url, dialect or api_version of an upstream."""
    allowed = {k: v for k, v in changes.items() if k in ("base_url", "dialect", "api_version")}
    if not allowed:
        return
    with conn:
        sets = ", ".join(f"{k} = ?" for k in allowed)
        if not conn.execute(f"UPDATE upstreams SET {sets} WHERE name = ?", (*allowed.values(), name)).rowcount:
            raise NotFound(f"no upstream named {name!r}")
        audit.record(conn, "upstreams.update", name, {k: str(v) if v is not None else None for k, v in allowed.items()})
        _changed(conn)


def list_upstreams(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT u.id, u.name, u.base_url, u.dialect, u.api_version, u.enabled, u.created_at,"
        " (SELECT count(*) FROM groups g WHERE g.upstream_id = u.id) AS groups,"
        " (SELECT count(*) FROM upstream_keys k JOIN groups g ON k.group_id = g.id WHERE g.upstream_id = u.id)"
        " AS keys FROM upstreams u ORDER BY u.id LIMIT 1000"
    ).fetchall()


def get_upstream(conn: sqlite3.Connection, name: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM upstreams WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"no upstream named {name!r}")
    return row


def set_upstream_enabled(conn: sqlite3.Connection, name: str, enabled: bool) -> None:
    with conn:
        if not conn.execute("UPDATE upstreams SET enabled = ? WHERE name = ?", (int(enabled), name)).rowcount:
            raise NotFound(f"no upstream named {name!r}")
        audit.record(conn, "upstreams.enable" if enabled else "upstreams.disable", name)
        _changed(conn)


def delete_upstream(conn: sqlite3.Connection, name: str) -> int:
    """Delete an upstream with its groups, their keys and models; returns how many keys went."""
    upstream_id = get_upstream(conn, name)["id"]
    with conn:
        groups = [r[0] for r in conn.execute("SELECT id FROM groups WHERE upstream_id = ?", (upstream_id,))]
        keys = sum(_delete_group(conn, g) for g in groups)
        conn.execute("DELETE FROM upstreams WHERE id = ?", (upstream_id,))
        audit.record(conn, "upstreams.delete", name, {"id": upstream_id, "groups": groups, "keys_deleted": keys})
        _changed(conn)
        bump_revision(conn, "keys")
    return keys


# --------------------------------------------------------------------------- groups


def split_label(label: str) -> tuple[str, str]:
    """UPSTREAM/GROUP → (upstream, group); ValueError when it is not that shape."""
    upstream, sep, group = label.partition("/")
    if not sep or not upstream.strip() or not group.strip() or "/" in group:
        raise ValueError(f"{label!r} is not UPSTREAM/GROUP (e.g. default/default)")
    return upstream.strip(), group.strip()


def group_id_of(conn: sqlite3.Connection, label: str) -> int:
    upstream, group = split_label(label)
    row = conn.execute(
        "SELECT g.id FROM groups g JOIN upstreams u ON g.upstream_id = u.id WHERE u.name = ? AND g.name = ?",
        (upstream, group),
    ).fetchone()
    if row is None:
        raise NotFound(f"no group {label!r}")
    return row[0]


def default_group_id(conn: sqlite3.Connection) -> int:
    """Where keys added without --group go: default/default."""
    try:
        return group_id_of(conn, f"{DEFAULT}/{DEFAULT}")
    except NotFound:
        raise NotFound("there is no group default/default: name one with --group UPSTREAM/GROUP") from None


def add_group(conn: sqlite3.Connection, label: str, priority: int = 0, weight: float = 1.0) -> int:
    upstream, group = split_label(label)
    if not (0 < weight <= 1000):
        raise ValueError(f"a group's weight must be above 0 and at most 1000, not {weight}")
    upstream_id = get_upstream(conn, upstream)["id"]
    try:
        with conn:
            cursor = conn.execute(
                "INSERT INTO groups (upstream_id, name, priority, weight, enabled, created_at)"
                " VALUES (?, ?, ?, ?, 1, ?)",
                (upstream_id, group, priority, weight, time.time()),
            )
            audit.record(conn, "groups.add", label, {"id": cursor.lastrowid, "priority": priority, "weight": weight})
            _changed(conn)
    except sqlite3.IntegrityError:
        raise Conflict(f"a group {label!r} already exists") from None
    return inserted_id(cursor)


def update_group(conn: sqlite3.Connection, group_id: int, **changes) -> None:
    allowed = {k: v for k, v in changes.items() if k in ("priority", "weight") and v is not None}
    if "weight" in allowed and not (0 < allowed["weight"] <= 1000):
        raise ValueError(f"a group's weight must be above 0 and at most 1000, not {allowed['weight']}")
    if not allowed:
        return
    with conn:
        sets = ", ".join(f"{k} = ?" for k in allowed)
        if not conn.execute(f"UPDATE groups SET {sets} WHERE id = ?", (*allowed.values(), group_id)).rowcount:
            raise NotFound(f"no group with id {group_id}")
        audit.record(conn, "groups.update", group_id, allowed)
        _changed(conn)


_GROUP_COLUMNS = (
    "g.id, u.name || '/' || g.name AS label, u.name AS upstream, g.name, g.priority, g.weight, g.enabled,"
    " u.enabled AS upstream_enabled, u.dialect, g.models_refreshed_at, g.created_at,"
    " (SELECT count(*) FROM upstream_keys k WHERE k.group_id = g.id) AS keys,"
    # Keys the proxy may pick now: active, or cooling past the end of their rest.
    " (SELECT count(*) FROM upstream_keys k WHERE k.group_id = g.id AND (k.state = 'active' OR (k.state = 'cooling'"
    " AND coalesce(k.cooldown_until, 0) <= CAST(strftime('%s', 'now') AS REAL)))) AS usable_keys,"
    " (SELECT count(*) FROM group_models m WHERE m.group_id = g.id) AS models"
)


def list_groups(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute(
        f"SELECT {_GROUP_COLUMNS} FROM groups g JOIN upstreams u ON g.upstream_id = u.id"
        " ORDER BY g.priority DESC, g.id LIMIT 1000"
    ).fetchall()


def get_group(conn: sqlite3.Connection, group_id: int) -> sqlite3.Row:
    row = conn.execute(
        f"SELECT {_GROUP_COLUMNS}, u.base_url, u.api_version FROM groups g JOIN upstreams u ON g.upstream_id = u.id"
        " WHERE g.id = ?",
        (group_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no group with id {group_id}")
    return row


def set_group_enabled(conn: sqlite3.Connection, group_id: int, enabled: bool) -> None:
    with conn:
        if not conn.execute("UPDATE groups SET enabled = ? WHERE id = ?", (int(enabled), group_id)).rowcount:
            raise NotFound(f"no group with id {group_id}")
        audit.record(conn, "groups.enable" if enabled else "groups.disable", group_id)
        _changed(conn)


def _delete_group(conn: sqlite3.Connection, group_id: int) -> int:
    keys = conn.execute("DELETE FROM upstream_keys WHERE group_id = ?", (group_id,)).rowcount
    conn.execute("DELETE FROM group_models WHERE group_id = ?", (group_id,))
    conn.execute("DELETE FROM groups WHERE id = ?", (group_id,))
    return keys


def delete_group(conn: sqlite3.Connection, group_id: int) -> int:
    """Delete a group with its keys and models; returns how many keys went."""
    label = get_group(conn, group_id)["label"]
    with conn:
        keys = _delete_group(conn, group_id)
        audit.record(conn, "groups.delete", group_id, {"label": label, "keys_deleted": keys})
        _changed(conn)
        bump_revision(conn, "keys")
    return keys


# --------------------------------------------------------------------------- models


def add_model(
    conn: sqlite3.Connection, group_id: int, model: str, upstream_model: str | None, source: str = "manual"
) -> None:
    """Add a model to a group, or change the upstream name of one it has."""
    get_group(conn, group_id)
    with conn:
        conn.execute(
            "INSERT INTO group_models (group_id, model, upstream_model, source, created_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (group_id, model) DO UPDATE SET upstream_model = excluded.upstream_model,"
            " source = excluded.source",
            (group_id, model, upstream_model or None, source, time.time()),
        )
        audit.record(conn, "models.add", group_id, {"model": model, "upstream_model": upstream_model or None})
        _changed(conn)


def delete_model(conn: sqlite3.Connection, group_id: int, model: str) -> None:
    with conn:
        if not conn.execute("DELETE FROM group_models WHERE group_id = ? AND model = ?", (group_id, model)).rowcount:
            raise NotFound(f"group {group_id} has no model {model!r}")
        audit.record(conn, "models.delete", group_id, {"model": model})
        _changed(conn)


def store_fetched_models(conn: sqlite3.Connection, group_id: int, models: Iterable[str]) -> tuple[int, int]:
    """What upstream's /v1/models listed replaces what the last refresh found; manual entries stay.

    Returns (added, removed).
    """
    with conn:
        return fetched_models_in_transaction(conn, group_id, models)


def fetched_models_in_transaction(conn: sqlite3.Connection, group_id: int, models: Iterable[str]) -> tuple[int, int]:
    """store_fetched_models inside the caller's transaction (the capture writer's batch)."""
    wanted = set(models)
    now = time.time()
    rows = conn.execute("SELECT model, source FROM group_models WHERE group_id = ?", (group_id,)).fetchall()
    present = {r["model"]: r["source"] for r in rows}
    stale = [m for m, source in present.items() if source == "fetched" and m not in wanted]
    new = [m for m in sorted(wanted) if m not in present]
    conn.executemany("DELETE FROM group_models WHERE group_id = ? AND model = ?", [(group_id, m) for m in stale])
    conn.executemany(
        "INSERT INTO group_models (group_id, model, upstream_model, source, created_at)"
        " VALUES (?, ?, NULL, 'fetched', ?)",
        [(group_id, m, now) for m in new],
    )
    conn.execute("UPDATE groups SET models_refreshed_at = ? WHERE id = ?", (now, group_id))
    if stale or new:
        audit.record(conn, "models.refresh", group_id, {"added": new, "removed": stale})
        _changed(conn)
    return len(new), len(stale)


def list_models(conn: sqlite3.Connection, group_id: int | None = None) -> list[sqlite3.Row]:
    where, params = ("WHERE m.group_id = ?", (group_id,)) if group_id is not None else ("", ())
    return conn.execute(
        "SELECT m.model, m.upstream_model, m.source, g.id AS group_id, u.name || '/' || g.name AS label"
        f" FROM group_models m JOIN groups g ON m.group_id = g.id JOIN upstreams u ON g.upstream_id = u.id {where}"
        " ORDER BY m.model, g.priority DESC, g.id LIMIT 10000",
        params,
    ).fetchall()


def set_fallbacks(conn: sqlite3.Connection, model: str, fallbacks: list[str]) -> None:
    """The ordered models tried after every group of `model`; an empty list clears them."""
    if model in fallbacks:
        raise ValueError(f"{model!r} cannot be its own fallback")
    with conn:
        conn.execute("DELETE FROM model_fallbacks WHERE model = ?", (model,))
        conn.executemany(
            "INSERT INTO model_fallbacks (model, position, fallback) VALUES (?, ?, ?)",
            [(model, i, f) for i, f in enumerate(dict.fromkeys(fallbacks), start=1)],
        )
        audit.record(conn, "models.fallback", model, {"fallbacks": list(dict.fromkeys(fallbacks))})
        _changed(conn)


def fallbacks(conn: sqlite3.Connection) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for row in conn.execute("SELECT model, fallback FROM model_fallbacks ORDER BY model, position LIMIT 10000"):
        result.setdefault(row["model"], []).append(row["fallback"])
    return result


class SqliteRouteStore:
    """core.ports.RouteStore over one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def store_fetched_models(self, group_id: int, models: list[str]) -> tuple[int, int]:
        return store_fetched_models(self.conn, group_id, models)

    def load_routes(self) -> tuple[list[Group], dict[str, list[str]]]:
        return load_routes(self.conn)


# --------------------------------------------------------------------------- for the proxy


def load_routes(conn: sqlite3.Connection) -> tuple[list[Group], dict[str, list[str]]]:
    """Every group with its upstream and models (disabled ones too: the table leaves them out)."""
    upstreams = {
        row["id"]: Upstream(
            id=row["id"],
            name=row["name"],
            base_url=row["base_url"],
            dialect=Dialect(row["dialect"]),
            api_version=row["api_version"],
            enabled=bool(row["enabled"]),
        )
        for row in conn.execute("SELECT * FROM upstreams")
    }
    models: dict[int, dict[str, str | None]] = {}
    for row in conn.execute("SELECT group_id, model, upstream_model FROM group_models"):
        models.setdefault(row["group_id"], {})[row["model"]] = row["upstream_model"]
    groups = [
        Group(
            id=row["id"],
            upstream=upstreams[row["upstream_id"]],
            name=row["name"],
            priority=row["priority"],
            weight=row["weight"],
            enabled=bool(row["enabled"]),
            models=models.get(row["id"], {}),
            models_fetched=row["models_refreshed_at"] is not None,
        )
        for row in conn.execute("SELECT * FROM groups ORDER BY id")
        if row["upstream_id"] in upstreams
    ]
    return groups, fallbacks(conn)


def group_labels(conn: sqlite3.Connection) -> dict[int, str]:
    """id → UPSTREAM/GROUP, for pages that show ids of groups."""
    return {
        row[0]: row[1]
        for row in conn.execute(
            "SELECT g.id, u.name || '/' || g.name FROM groups g JOIN upstreams u ON g.upstream_id = u.id LIMIT 10000"
        )
    }


def upstream_names(conn: sqlite3.Connection) -> dict[int, str]:
    return {row[0]: row[1] for row in conn.execute("SELECT id, name FROM upstreams LIMIT 10000")}


def groups_by_id(conn: sqlite3.Connection) -> dict[int, Group]:
    return {g.id: g for g in load_routes(conn)[0]}
