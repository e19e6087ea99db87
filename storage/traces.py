"""Trace probes in storage: the traces table and the fetches of their images (docs/traces.md).

The trace listener looks a trace id up read-only (`known`) and writes only for a trace that
exists (`record_fetch`), at most core.traces.MAX_FETCHES_PER_TRACE rows per trace.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from core import traces as core_traces
from storage import audit

PAGE_LIMIT = 500


def create(conn: sqlite3.Connection, group_id: int, group_label: str, model: str, scheduled: bool = False) -> dict:
    """A new trace with a fresh unguessable id, in the audit log (`traces.run`); its row."""
    trace_id = core_traces.new_trace_id()
    now = time.time()
    with conn:
        cursor = conn.execute(
            "INSERT INTO traces (trace_id, group_id, group_label, model, created_at, scheduled)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (trace_id, group_id, group_label, model, now, int(scheduled)),
        )
        row_id = int(cursor.lastrowid or 0)
        actor = audit.current_actor() or (audit.Actor(audit.SCHEDULER) if scheduled else None)
        audit.record(conn, "traces.run", group_label, {"id": row_id, "model": model}, actor)
    return get(conn, row_id) or {}


def mark_sent(conn: sqlite3.Connection, row_id: int, at: float) -> None:
    with conn:
        conn.execute("UPDATE traces SET sent_at = ? WHERE id = ?", (at, row_id))


def record_answer(conn: sqlite3.Connection, row_id: int, answer: core_traces.Answer, at: float) -> None:
    with conn:
        conn.execute(
            "UPDATE traces SET answered_at = ?, status = ?, answer_model = ?, system_fingerprint = ?,"
            " answer_text = ?, error = ? WHERE id = ?",
            (at, answer.status, answer.model, answer.system_fingerprint, answer.text, answer.error, row_id),
        )


def finish(conn: sqlite3.Connection, row_id: int, flow_row: int | None) -> None:
    """The grace period is over: the verdict stands; `flow_row` is the trace's flow (the one the proxy
    named in its answer), None when it was not recorded in time or the proxy was not reached."""
    with conn:
        conn.execute("UPDATE traces SET finished_at = ?, flow_id = ? WHERE id = ?", (time.time(), flow_row, row_id))


def known(conn: sqlite3.Connection, trace_id: str) -> tuple[int, float | None] | None:
    """The row id and sent_at of the trace `trace_id`, or None: a read, never a write."""
    if not core_traces.valid_trace_id(trace_id):
        return None
    row = conn.execute("SELECT id, sent_at FROM traces WHERE trace_id = ?", (trace_id,)).fetchone()
    return (int(row["id"]), row["sent_at"]) if row else None


def record_fetch(
    conn: sqlite3.Connection,
    row_id: int,
    sent_at: float | None,
    address: str,
    headers: list[tuple[str, str]],
    at: float,
) -> bool:
    """One fetch of trace `row_id`'s image; False (nothing written) once the trace has its fill."""
    user_agent = next((v for n, v in headers if n.lower() == "user-agent"), "")[: core_traces.MAX_USER_AGENT]
    stored = json.dumps(core_traces.bounded_headers(headers))
    # One statement: the count and the insert under the same write lock, so a burst of parallel
    # fetches cannot push a trace past its fill.
    with conn:
        cursor = conn.execute(
            "INSERT INTO trace_fetches (trace_id, at, address, user_agent, headers, delay_seconds)"
            " SELECT ?, ?, ?, ?, ?, ? WHERE (SELECT count(*) FROM trace_fetches WHERE trace_id = ?) < ?",
            (
                row_id,
                at,
                address[:100],
                user_agent,
                stored,
                None if sent_at is None else round(at - sent_at, 3),
                row_id,
                core_traces.MAX_FETCHES_PER_TRACE,
            ),
        )
    return cursor.rowcount == 1


def fetches_of(conn: sqlite3.Connection, row_id: int) -> list[dict]:
    rows = conn.execute(
        "SELECT at, address, user_agent, headers, delay_seconds FROM trace_fetches WHERE trace_id = ? ORDER BY id"
        f" LIMIT {core_traces.MAX_FETCHES_PER_TRACE}",
        (row_id,),
    ).fetchall()
    return [{**dict(r), "headers": [list(pair) for pair in json.loads(r["headers"])]} for r in rows]


def get(conn: sqlite3.Connection, row_id: int) -> dict | None:
    row = conn.execute("SELECT * FROM traces WHERE id = ?", (row_id,)).fetchone()
    return dict(row) if row else None


def listing(
    conn: sqlite3.Connection, *, group_id: int | None = None, model: str | None = None, limit: int = 100
) -> list[dict]:
    """Traces newest first, of one group or one model if asked, each with its fetch count and addresses."""
    where: list[str] = []
    params: list[Any] = []
    if group_id is not None:
        where.append("t.group_id = ?")
        params.append(group_id)
    if model is not None:
        where.append("t.model = ?")
        params.append(model)
    sql = (
        "SELECT t.*, (SELECT count(*) FROM trace_fetches f WHERE f.trace_id = t.id) AS fetch_count,"
        " (SELECT count(DISTINCT address) FROM trace_fetches f WHERE f.trace_id = t.id) AS address_count"
        " FROM traces t" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY t.id DESC LIMIT ?"
    )
    return [dict(r) for r in conn.execute(sql, (*params, min(limit, PAGE_LIMIT))).fetchall()]


def delete(conn: sqlite3.Connection, row_id: int) -> bool:
    """Trace `row_id` and its fetches gone, in the audit log (`traces.delete`); False if there was none."""
    with conn:
        row = conn.execute("SELECT group_label, model FROM traces WHERE id = ?", (row_id,)).fetchone()
        if row is None:
            return False
        conn.execute("DELETE FROM trace_fetches WHERE trace_id = ?", (row_id,))
        conn.execute("DELETE FROM traces WHERE id = ?", (row_id,))
        audit.record(conn, "traces.delete", row["group_label"], {"id": row_id, "model": row["model"]})
    return True
