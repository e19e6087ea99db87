"""Captured flows: batch inserts from the proxy's writer, reads for the UI."""

from __future__ import annotations

import json
import operator
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from core.records import FlowRecord
from storage.sql import insert_many, placeholders

# The one mapping of a FlowRecord to the flows table: every other module reads or writes
# FlowRecords. JSON columns hold lists; the 0/1 columns hold booleans.
JSON_COLUMNS = frozenset({"request_headers", "response_headers", "chunk_times", "websocket_messages"})
BOOLEAN_COLUMNS = frozenset({"stream", "request_body_truncated", "response_body_truncated"})
FLOW_COLUMNS = tuple(f.name for f in fields(FlowRecord) if f.name != "attempt_log")
_INSERT_ATTEMPT = (
    "INSERT INTO attempts (flow_id, attempt, upstream_key_id, status, error, started_at, duration_ms,"
    " upstream_id, group_id, model)"
)
_INSERT_HEAD = f"INSERT INTO flows ({', '.join(FLOW_COLUMNS)})"

# Columns the list views need; bodies and headers stay out of them.
SUMMARY_COLUMNS = (
    "id, flow_id, started_at, duration_ms, method, path, status, model, stream,"
    " client_key_id, upstream_key_id, attempts, total_tokens, error, upstream_id, group_id, fallback_model,"
    " client_id, refusal"
)


_ALL_FIELDS = operator.attrgetter(*FLOW_COLUMNS)  # one C call per record, in the writer thread
_JSON_AT = [i for i, name in enumerate(FLOW_COLUMNS) if name in JSON_COLUMNS]
_BOOLEAN_AT = [i for i, name in enumerate(FLOW_COLUMNS) if name in BOOLEAN_COLUMNS]


def column_values(record: FlowRecord) -> list:
    """The record as a flows row, in FLOW_COLUMNS order."""
    values = list(_ALL_FIELDS(record))
    for i in _JSON_AT:
        if values[i] is not None:
            values[i] = json.dumps(values[i])
    for i in _BOOLEAN_AT:
        values[i] = int(bool(values[i]))
    return values


def insert_batch(conn: sqlite3.Connection, records: Iterable[FlowRecord]) -> None:
    """Insert flows and add them to the per-key usage counters, in the caller's transaction.

    A few statements per batch, not a few per row: see storage.sql.insert_many.
    """
    records = list(records)
    insert_many(conn, _INSERT_HEAD, [column_values(r) for r in records])
    insert_attempts(conn, records)
    for table, column in (("upstream_keys", "upstream_key_id"), ("client_keys", "client_key_id")):
        usage = [(key_id, *sums) for key_id, sums in _usage_by(records, column).items()]
        if not usage:
            continue
        # One UPDATE for every key of the batch (UPDATE ... FROM needs SQLite 3.33).
        conn.execute(
            f"UPDATE {table} SET requests = requests + u.column2, prompt_tokens = prompt_tokens + u.column3,"
            " completion_tokens = completion_tokens + u.column4,"
            " last_used_at = max(coalesce(last_used_at, 0), u.column5), cost = cost + u.column6"
            f" FROM (VALUES {placeholders(len(usage), 6)}) AS u WHERE {table}.id = u.column1",
            [v for row in usage for v in row],
        )


def insert_attempts(conn: sqlite3.Connection, records: list[FlowRecord]) -> None:
    """Attempt rows of retried flows; each failed attempt also counts as a request on its key."""
    attempts = [(r.flow_id, a) for r in records for a in r.attempt_log]
    if not attempts:
        return
    insert_many(
        conn,
        _INSERT_ATTEMPT,
        [
            (
                flow_id,
                a.attempt,
                a.key_id,
                a.status,
                a.error,
                a.started_at,
                a.duration_ms,
                a.upstream_id,
                a.group_id,
                a.model,
            )
            for flow_id, a in attempts
        ],
    )
    failed = [a for r in records for a in r.attempt_log[:-1]]  # the last one is the flow's own
    conn.executemany(
        "UPDATE upstream_keys SET requests = requests + 1, last_used_at = max(coalesce(last_used_at, 0), ?)"
        " WHERE id = ?",
        [(a.started_at, a.key_id) for a in failed],
    )


def attempts_of(conn: sqlite3.Connection, flow_id: str) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT attempt, upstream_key_id, status, error, started_at, duration_ms, upstream_id, group_id, model"
        " FROM attempts"
        " WHERE flow_id = ? ORDER BY attempt LIMIT 100",
        (flow_id,),
    ).fetchall()


def _usage_by(records: list[FlowRecord], column: str) -> dict[int, list]:
    usage: dict[int, list] = defaultdict(lambda: [0, 0, 0, 0.0, 0.0])
    for record in records:
        key_id = getattr(record, column)
        if key_id is None:
            continue
        entry = usage[key_id]
        entry[0] += 1
        entry[1] += record.prompt_tokens or 0
        entry[2] += record.completion_tokens or 0
        entry[3] = max(entry[3], record.started_at)
        entry[4] += record.cost or 0.0
    return usage


def recent_flows(conn: sqlite3.Connection, limit: int = 50, before_id: int | None = None) -> list[sqlite3.Row]:
    """Newest first; `before_id` continues a page (keyset pagination, no OFFSET)."""
    limit = max(1, min(limit, 500))
    if before_id is None:
        return conn.execute(f"SELECT {SUMMARY_COLUMNS} FROM flows ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return conn.execute(
        f"SELECT {SUMMARY_COLUMNS} FROM flows WHERE id < ? ORDER BY id DESC LIMIT ?", (before_id, limit)
    ).fetchall()


STATUS_CLASSES = {"2xx": (200, 300), "3xx": (300, 400), "4xx": (400, 500), "5xx": (500, 600)}


@dataclass(frozen=True)
class FlowFilter:
    """What the flows page and its JSON twin filter on; every field is optional."""

    q: str | None = None  # full-text search over path, model and both bodies
    status: str | None = None  # 2xx, 3xx, 4xx, 5xx, one code such as "429", or "error" (no response at all)
    model: str | None = None
    path: str | None = None  # a prefix
    client_key_id: int | None = None
    client_id: int | None = None  # the client, whichever of its keys
    upstream_key_id: int | None = None
    upstream_id: int | None = None
    group_id: int | None = None
    stream: bool | None = None
    refusal: str | None = None  # the code keyrotor refused with ("any": every refused flow)
    since: float | None = None
    until: float | None = None
    after_id: int | None = None  # only flows newer than this (the page's live updates)

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


def fts_query(text: str) -> str | None:
    """User text as an FTS5 query: every word must appear, taken literally (no operators, no syntax errors)."""
    terms = [t for t in text.split() if t]
    if not terms:
        return None
    return " ".join('"' + t.replace('"', '""') + '"' for t in terms[:20])


def _conditions(f: FlowFilter, table: str) -> tuple[list[str], list[Any]]:
    where, params = [], []
    if f.status == "error":
        where.append(f"{table}.status IS NULL")
    elif f.status in STATUS_CLASSES:
        low, high = STATUS_CLASSES[f.status]
        where.append(f"{table}.status >= ? AND {table}.status < ?")
        params += [low, high]
    elif f.status and f.status.isdecimal():  # one code, e.g. 429
        where.append(f"{table}.status = ?")
        params.append(int(f.status))
    for column in ("model", "client_key_id", "client_id", "upstream_key_id", "upstream_id", "group_id"):
        value = getattr(f, column)
        if value is not None:
            where.append(f"{table}.{column} = ?")
            params.append(value)
    if f.path:
        # A range rather than LIKE: exact prefix, no wildcard surprises from "%" or "_" in the input.
        where.append(f"{table}.path >= ? AND {table}.path < ?")
        params += [f.path, f.path + "\U0010ffff"]
    if f.stream is not None:
        where.append(f"{table}.stream = ?")
        params.append(int(f.stream))
    if f.refusal == "any":
        where.append(f"{table}.refusal IS NOT NULL")
    elif f.refusal:
        where.append(f"{table}.refusal = ?")
        params.append(f.refusal)
    if f.since is not None:
        where.append(f"{table}.started_at >= ?")
        params.append(f.since)
    if f.until is not None:
        where.append(f"{table}.started_at < ?")
        params.append(f.until)
    return where, params


# A time range this many rows wide or narrower is turned into the range of ids it covers.
NARROW_RANGE_ROWS = 200_000


def _id_range(conn: sqlite3.Connection, f: FlowFilter, before_id: int | None) -> tuple[int, int] | None:
    """Bounds (inclusive) on the ids a query can return; None when nothing can match.

    Each filter is one index walk newest first, by id: the live updates' `after`, the next
    page's `before`, and a time range, whose rows lie in an id range because ids follow the
    order in which flows ended. A row id bound is what lets an index on model or key, or the
    full-text index, start and stop at the right place instead of walking every newer row.
    """
    low, high = 1, 2**63 - 1
    if f.after_id is not None:
        low = f.after_id + 1
    if before_id is not None:
        high = before_id - 1
    if f.since is not None or f.until is not None:
        since = f.since if f.since is not None else float("-inf")
        until = f.until if f.until is not None else float("inf")
        if _estimated_rows(conn, since, until) <= NARROW_RANGE_ROWS:
            first, last = conn.execute(
                "SELECT min(id), max(id) FROM flows WHERE started_at >= ? AND started_at < ?", (since, until)
            ).fetchone()  # an index-only walk of the range
            if first is None:
                return None
            low, high = max(low, first), min(high, last)
    return (low, high) if low <= high else None


def _estimated_rows(conn: sqlite3.Connection, since: float, until: float) -> int:
    """Roughly how many flows started in [since, until): the ids at its two ends, two index seeks."""
    first = conn.execute("SELECT id FROM flows WHERE started_at >= ? ORDER BY started_at LIMIT 1", (since,)).fetchone()
    last = conn.execute(
        "SELECT id FROM flows WHERE started_at < ? ORDER BY started_at DESC LIMIT 1", (until,)
    ).fetchone()
    if first is None or last is None:
        return 0
    return abs(last[0] - first[0])


def search_flows(
    conn: sqlite3.Connection,
    f: FlowFilter,
    limit: int = 50,
    before_id: int | None = None,
    columns: str = SUMMARY_COLUMNS,
) -> list[sqlite3.Row]:
    """Newest first, filtered; `before_id` continues a page (keyset pagination, never OFFSET)."""
    limit = max(1, min(limit, 1000))
    ids = _id_range(conn, f, before_id)
    if ids is None:
        return []
    query = fts_query(f.q) if f.q else None
    where, params = _conditions(f, "flows")
    selected = ", ".join(f"flows.{c.strip()}" for c in columns.split(","))
    if query is None:
        sql = f"SELECT {selected} FROM flows"
        driver = "flows.id"
    else:
        # Driven by the index, newest match first: FTS5 walks rowids in order and stops at LIMIT.
        sql = f"SELECT {selected} FROM flows_fts JOIN flows ON flows.id = flows_fts.rowid"
        where.insert(0, "flows_fts MATCH ?")
        params.insert(0, query)
        driver = "flows_fts.rowid"  # bounds on flows.id would not reach the full-text walk
    where.append(f"{driver} BETWEEN ? AND ?")
    params += ids
    sql += " WHERE " + " AND ".join(where)
    return conn.execute(f"{sql} ORDER BY {driver} DESC LIMIT ?", (*params, limit)).fetchall()


def get_flow(conn: sqlite3.Connection, flow_row_id: int) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM flows WHERE id = ?", (flow_row_id,)).fetchone()


def count_flows(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM flows").fetchone()[0]


PURGE_CHUNK = 2000  # rows per transaction: the writer's next batch never waits long


def purge_chunk(conn: sqlite3.Connection, older_than: float | None, keep_rows: int | None) -> int:
    """Delete up to PURGE_CHUNK of the oldest flows that are past retention; returns how many went."""
    boundaries = []
    if older_than is not None:
        row = conn.execute(
            "SELECT max(id) FROM (SELECT id FROM flows WHERE started_at < ? ORDER BY started_at LIMIT ?)",
            (older_than, PURGE_CHUNK),
        ).fetchone()
        if row[0] is not None:
            boundaries.append(row[0])
    if keep_rows is not None:
        row = conn.execute("SELECT id FROM flows ORDER BY id DESC LIMIT 1 OFFSET ?", (keep_rows,)).fetchone()
        if row is not None:
            boundaries.append(row[0])
    if not boundaries:
        return 0
    with conn:
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM flows WHERE id <= ? ORDER BY id LIMIT ?", (max(boundaries), PURGE_CHUNK)
            )
        ]
        if not ids:
            return 0
        conn.execute("DELETE FROM flows WHERE id >= ? AND id <= ?", (ids[0], ids[-1]))
        conn.execute(
            "DELETE FROM attempts WHERE started_at < coalesce((SELECT min(started_at) FROM flows), ?)", (float("inf"),)
        )
    return len(ids)
