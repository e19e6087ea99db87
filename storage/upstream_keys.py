"""Upstream (pooled) keys: adding, listing, state changes. Values exist in clear only in memory."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable

from core.keys import NewKey, clean_name
from core.models import KeyState, PoolKey
from storage import audit
from storage.db import bump_revision, inserted_id
from storage.secrets import KeyCipher

STATES = tuple(KeyState)


class SqliteKeyStore:
    """core.ports.KeyStore over one connection and the installation's cipher."""

    def __init__(self, conn: sqlite3.Connection, cipher: KeyCipher) -> None:
        self.conn = conn
        self.cipher = cipher

    def load_pool(self) -> list[PoolKey]:
        return load_pool(self.conn, self.cipher)

    def insert(self, keys: list[NewKey], group_id: int | None = None) -> tuple[list[int], int]:
        return insert_keys(self.conn, self.cipher, keys, group_id)

    def ids_in_state(self, states: Iterable[KeyState]) -> list[int]:
        return ids_in_state(self.conn, states)

    def set_admin_state(self, key_ids: Iterable[int], state: KeyState, reason: str) -> int:
        return set_admin_state(self.conn, key_ids, state, reason)


def insert_keys(
    conn: sqlite3.Connection, cipher: KeyCipher, keys: Iterable[NewKey], group_id: int | None = None
) -> tuple[list[int], int]:
    """Add well-formed keys (core.keys checks them) to a group (default: default/default).

    Returns (ids added, duplicates skipped). A key that is already stored keeps its name and group.
    """
    from storage.routes import default_group_id

    group_id = default_group_id(conn) if group_id is None else group_id
    added: list[int] = []
    duplicates = 0
    now = time.time()
    with conn:
        for key in keys:
            cursor = conn.execute(
                "INSERT INTO upstream_keys"
                " (fingerprint, secret, last4, name, state, created_at, state_changed_at, group_id)"
                " VALUES (?, ?, ?, ?, 'active', ?, ?, ?) ON CONFLICT(fingerprint) DO NOTHING",
                (
                    cipher.fingerprint(key.value),
                    cipher.encrypt(key.value),
                    key.value[-4:],
                    key.name,
                    now,
                    now,
                    group_id,
                ),
            )
            if cursor.rowcount:
                added.append(inserted_id(cursor))
            else:
                duplicates += 1
        if added:
            audit.record(
                conn, "keys.add", _ids(added), {"group_id": group_id, "added": len(added), "duplicates": duplicates}
            )
            bump_revision(conn, "keys")
    return added, duplicates


def _ids(ids: Iterable[int]) -> str:
    return ",".join(map(str, ids))


def list_keys(conn: sqlite3.Connection, limit: int = 1000, after_id: int = 0) -> list[sqlite3.Row]:
    """Oldest first; `after_id` continues a page (keyset pagination)."""
    return conn.execute(
        f"SELECT {_LISTED} FROM upstream_keys WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
    ).fetchall()


_LISTED = (
    "id, name, last4, state, state_reason, cooldown_until, weight, requests,"
    " prompt_tokens, completion_tokens, cost, last_used_at, created_at, group_id,"
    " (SELECT u.name || '/' || g.name FROM groups g JOIN upstreams u ON g.upstream_id = u.id"
    " WHERE g.id = upstream_keys.group_id) AS group_label"
)


def get_key(conn: sqlite3.Connection, key_id: int) -> sqlite3.Row | None:
    """One key as list_keys shows it (never its value)."""
    return conn.execute(f"SELECT {_LISTED} FROM upstream_keys WHERE id = ?", (key_id,)).fetchone()


def rename_key(conn: sqlite3.Connection, key_id: int, name: str | None) -> int:
    """Set or clear (None, "") a key's name. No revision bump: the proxy does not use names."""
    with conn:
        count = conn.execute("UPDATE upstream_keys SET name = ? WHERE id = ?", (clean_name(name), key_id)).rowcount
        if count:
            audit.record(conn, "keys.rename", key_id, {"name": clean_name(name)})
        return count


def labels_of(conn: sqlite3.Connection, key_ids: Iterable[int]) -> dict[int, tuple[str | None, str]]:
    """id → (name, last four) for the keys a page shows; deleted keys are missing."""
    ids = sorted({i for i in key_ids if i is not None})[:1000]
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = conn.execute(f"SELECT id, name, last4 FROM upstream_keys WHERE id IN ({marks})", ids)
    return {row["id"]: (row["name"], row["last4"]) for row in rows}


def load_pool(conn: sqlite3.Connection, cipher: KeyCipher) -> list[PoolKey]:
    """Every key with its decrypted value, for the proxy's in-memory pool."""
    pool = []
    for row in conn.execute(
        "SELECT id, secret, last4, state, state_reason, cooldown_until, weight, requests, state_changed_at,"
        " group_id FROM upstream_keys ORDER BY id"
    ):
        value = cipher.decrypt(row["secret"])
        if value is None:
            continue  # encrypted with another secret: unusable, and listed as such by the CLI
        pool.append(
            PoolKey(
                id=row["id"],
                value=value,
                last4=row["last4"],
                state=KeyState(row["state"]),
                state_reason=row["state_reason"],
                cooldown_until=row["cooldown_until"],
                weight=row["weight"],
                requests=row["requests"],
                state_changed_at=row["state_changed_at"],
                group_id=row["group_id"],
            )
        )
    return pool


# The reasons the CLI and UI give, as audit actions; others (re-validation) are logged as keys.state.
_STATE_ACTIONS = {
    "enabled by admin": "enable",
    "disabled by admin": "disable",
    "reset by admin": "reset",
    "re-validated": "validate",
}


def set_admin_state(conn: sqlite3.Connection, key_ids: Iterable[int], state: str, reason: str) -> int:
    """An admin's change (enable, disable, reset); the proxy picks it up through the revision."""
    ids = list(key_ids)
    with conn:
        count = 0
        for key_id in ids:
            count += conn.execute(
                "UPDATE upstream_keys SET state = ?, state_reason = ?, cooldown_until = NULL,"
                " state_changed_at = ? WHERE id = ?",
                (state, reason, time.time(), key_id),
            ).rowcount
        if count:
            audit.record(
                conn, f"keys.{_STATE_ACTIONS.get(reason, 'state')}", _ids(ids), {"state": str(state), "reason": reason}
            )
            bump_revision(conn, "keys")
    return count


def set_weight(conn: sqlite3.Connection, key_ids: Iterable[int], weight: float) -> int:
    """The weighted strategy's share of each key; the proxy picks it up through the revision."""
    if not (0 < weight <= 1000):
        raise ValueError(f"a weight must be above 0 and at most 1000, not {weight}")
    with conn:
        count = sum(
            conn.execute("UPDATE upstream_keys SET weight = ? WHERE id = ?", (weight, key_id)).rowcount
            for key_id in key_ids
        )
        if count:
            audit.record(conn, "keys.weight", _ids(key_ids), {"weight": weight})
            bump_revision(conn, "keys")
    return count


def count_by_state(conn: sqlite3.Connection) -> dict[str, int]:
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    counts.update({state: n for state, n in conn.execute("SELECT state, count(*) FROM upstream_keys GROUP BY state")})
    return counts


def ids_in_state(conn: sqlite3.Connection, states: Iterable[str]) -> list[int]:
    states = list(states)
    marks = ",".join("?" * len(states))
    return [r[0] for r in conn.execute(f"SELECT id FROM upstream_keys WHERE state IN ({marks})", states)]


def delete_keys(conn: sqlite3.Connection, key_ids: Iterable[int]) -> int:
    key_ids = list(key_ids)
    with conn:
        count = sum(conn.execute("DELETE FROM upstream_keys WHERE id = ?", (i,)).rowcount for i in key_ids)
        if count:
            audit.record(conn, "keys.delete", _ids(key_ids), {"deleted": count})
            bump_revision(conn, "keys")
    return count


def record_state(
    conn: sqlite3.Connection, key_id: int, state: str, reason: str | None, cooldown_until: float | None, at: float
) -> None:
    """A state the proxy learnt from upstream. No revision bump: the proxy already knows it."""
    conn.execute(
        "UPDATE upstream_keys SET state = ?, state_reason = ?, cooldown_until = ?, state_changed_at = ?"
        " WHERE id = ? AND state != 'disabled'",
        (state, reason, cooldown_until, at, key_id),
    )


# --------------------------------------------------------------------------- for the UI's group pages


def group_keys(conn: sqlite3.Connection, group_id: int, limit: int = 1000, after_id: int = 0) -> list[sqlite3.Row]:
    """A group's keys, oldest first, as upstream_keys.list_keys shows them (never their values)."""
    return conn.execute(
        f"SELECT {_LISTED} FROM upstream_keys WHERE group_id = ? AND id > ? ORDER BY id LIMIT ?",
        (group_id, after_id, limit),
    ).fetchall()


def group_key_states(conn: sqlite3.Connection, group_id: int) -> dict[int, str]:
    """id → state of every key of a group (the group page's counts and its pool actions)."""
    rows = conn.execute("SELECT id, state FROM upstream_keys WHERE group_id = ? LIMIT 100000", (group_id,))
    return {row[0]: row[1] for row in rows}
