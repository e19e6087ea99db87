"""Captured flows: batch inserts from the proxy's writer, reads for the UI."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

FLOW_COLUMNS = (
    "flow_id", "started_at", "first_byte_at", "ended_at", "duration_ms", "method", "path", "status",
    "model", "stream", "client_key_id", "upstream_key_id", "attempts", "prompt_tokens",
    "completion_tokens", "total_tokens", "cost", "client_addr", "error", "request_headers",
    "response_headers", "request_body", "request_body_size", "request_body_truncated",
    "response_body", "response_body_size", "response_body_truncated", "chunk_times",
)  # fmt: skip
_INSERT_ATTEMPT = (
    "INSERT INTO attempts (flow_id, attempt, upstream_key_id, status, error, started_at, duration_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT = f"INSERT INTO flows ({', '.join(FLOW_COLUMNS)}) VALUES ({', '.join('?' * len(FLOW_COLUMNS))})"

# Columns the list views need; bodies and headers stay out of them.
SUMMARY_COLUMNS = (
    "id, flow_id, started_at, duration_ms, method, path, status, model, stream,"
    " client_key_id, upstream_key_id, attempts, total_tokens, error"
)


def insert_batch(conn: sqlite3.Connection, rows: Iterable[dict[str, Any]]) -> None:
    """Insert rows and add them to the per-key usage counters, in the caller's transaction."""
    rows = list(rows)
    conn.executemany(_INSERT, [tuple(row.get(c) for c in FLOW_COLUMNS) for row in rows])
    insert_attempts(conn, rows)
    for table, column in (("upstream_keys", "upstream_key_id"), ("client_keys", "client_key_id")):
        for key_id, (count, prompt, completion, last) in _usage_by(rows, column).items():
            conn.execute(
                f"UPDATE {table} SET requests = requests + ?, prompt_tokens = prompt_tokens + ?,"
                " completion_tokens = completion_tokens + ?,"
                " last_used_at = max(coalesce(last_used_at, 0), ?) WHERE id = ?",
                (count, prompt, completion, last, key_id),
            )


def insert_attempts(conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
    """Attempt rows of retried flows; each failed attempt also counts as a request on its key."""
    attempts = [(row["flow_id"], a) for row in rows for a in row.get("attempt_rows") or ()]
    if not attempts:
        return
    conn.executemany(
        _INSERT_ATTEMPT,
        [(flow_id, a["attempt"], a["key_id"], a["status"], a["error"], a["started_at"], a.get("duration_ms"))
         for flow_id, a in attempts],
    )  # fmt: skip
    failed = [a for row in rows for a in (row.get("attempt_rows") or ())[:-1]]  # the last one is the flow's own
    conn.executemany(
        "UPDATE upstream_keys SET requests = requests + 1, last_used_at = max(coalesce(last_used_at, 0), ?)"
        " WHERE id = ?",
        [(a["started_at"], a["key_id"]) for a in failed],
    )


def attempts_of(conn: sqlite3.Connection, flow_id: str) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT attempt, upstream_key_id, status, error, started_at, duration_ms FROM attempts"
        " WHERE flow_id = ? ORDER BY attempt LIMIT 100",
        (flow_id,),
    ).fetchall()


def _usage_by(rows: list[dict[str, Any]], column: str) -> dict[int, list]:
    usage: dict[int, list] = defaultdict(lambda: [0, 0, 0, 0.0])
    for row in rows:
        key_id = row.get(column)
        if key_id is None:
            continue
        entry = usage[key_id]
        entry[0] += 1
        entry[1] += row.get("prompt_tokens") or 0
        entry[2] += row.get("completion_tokens") or 0
        entry[3] = max(entry[3], row["started_at"])
    return usage


def recent_flows(conn: sqlite3.Connection, limit: int = 50, before_id: int | None = None) -> list[sqlite3.Row]:
    """Newest first; `before_id` continues a page (keyset pagination, no OFFSET)."""
    limit = max(1, min(limit, 500))
    if before_id is None:
        return conn.execute(f"SELECT {SUMMARY_COLUMNS} FROM flows ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return conn.execute(
        f"SELECT {SUMMARY_COLUMNS} FROM flows WHERE id < ? ORDER BY id DESC LIMIT ?", (before_id, limit)
    ).fetchall()


def get_flow(conn: sqlite3.Connection, flow_row_id: int) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM flows WHERE id = ?", (flow_row_id,)).fetchone()


def count_flows(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM flows").fetchone()[0]
