"""Converting flows stored before schema v8 to the packed layout, a chunk per transaction.

Schema v8 only marks the existing rows (ids in flows_legacy's (low, high]); they stay
readable and searchable as they are. Each call of convert_chunk packs the next CHUNK of
them, oldest first, in one short write transaction: the capture writer runs it between
its batches while it has nothing to write, and `run.py storage migrate` runs it to the end
(beside a running proxy too: both take the write lock per chunk, and the progress is the
low mark in the database, so a stopped conversion carries on where it was).

When the last row is converted, the old index is emptied a chunk of pages at a time and
dropped: one DROP of gigabytes of index would hold the write lock for seconds.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from storage import flows, pg
from storage.sql import insert_many

CHUNK = 500  # rows per transaction: ~0.1-0.2 s on these machines, then capture gets the lock back
INDEX_PAGES_PER_CHUNK = 2000  # blocks of the old index deleted per transaction once it is unused
_PLAIN = ", ".join(flows.PACKED_COLUMNS)


@dataclass(frozen=True)
class Progress:
    remaining: int  # rows still in the old layout (an estimate from the id range)
    index_left: bool  # the old index still has to go


def progress(conn: sqlite3.Connection) -> Progress:
    if pg.is_postgres(conn):
        return Progress(0, False)  # a PostgreSQL database only ever held packed rows
    try:
        row = conn.execute("SELECT low, high FROM flows_legacy").fetchone()
    except sqlite3.OperationalError:
        return Progress(0, False)
    index_left = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (flows.LEGACY_FTS,)).fetchone() is not None
    return Progress(max(0, row[1] - row[0]) if row else 0, index_left)


def pending(conn: sqlite3.Connection) -> bool:
    found = progress(conn)
    return bool(found.remaining or found.index_left)


def convert_chunk(conn: sqlite3.Connection, packer: flows.FlowPacker, chunk: int = CHUNK) -> int:
    """Convert the next `chunk` old rows (or remove a chunk of the old index once none are left).

    Returns the rows converted, or 1 for a chunk of the index removed; 0 when nothing is left.
    """
    conn.execute("BEGIN IMMEDIATE")  # the low mark is read under the write lock: no chunk is converted twice
    try:
        done = _step(conn, packer, chunk)
        conn.commit()
        return done
    except BaseException:
        conn.rollback()
        raise


def _step(conn: sqlite3.Connection, packer: flows.FlowPacker, chunk: int) -> int:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'flows_legacy'").fetchone() is None:
        return 0  # converted and cleaned up already
    row = conn.execute("SELECT low, high FROM flows_legacy").fetchone()
    if row is None:
        return 0
    low, high = row
    if low < high:
        rows = conn.execute(
            f"SELECT id, method, status, path, model, {_PLAIN} FROM flows WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
            (low, high, chunk),
        ).fetchall()
        last = rows[-1]["id"] if rows else high
        if rows:
            _pack(conn, packer, rows)
        conn.execute("UPDATE flows_legacy SET low = ?", (last,))
        return max(1, len(rows))
    return _drop_old_index(conn)


def _pack(conn: sqlite3.Connection, packer: flows.FlowPacker, rows: list[sqlite3.Row]) -> None:
    texts = [[r[name] for name in flows.PACKED_COLUMNS] for r in rows]
    packed = packer.pack(conn, [(r["method"], r["status"], t) for r, t in zip(rows, texts, strict=True)])
    cleared = ", ".join(f"{name} = NULL" for name in flows.PACKED_COLUMNS)
    insert_many(
        conn,
        "WITH packed (id, content, parts) AS (",
        [(r["id"], content, parts) for r, (content, parts) in zip(rows, packed, strict=True)],
        f") UPDATE flows SET content = packed.content, parts = packed.parts, {cleared},"
        " client_id = coalesce(flows.client_id, flows.client_key_id)"  # v9 left it to this pass
        " FROM packed WHERE flows.id = packed.id",
    )
    insert_many(
        conn,
        f"INSERT INTO flows_fts (rowid, {', '.join(flows.FTS_COLUMNS)})",
        [(r["id"], r["path"], r["model"], t[2], t[3]) for r, t in zip(rows, texts, strict=True)],
    )


def _drop_old_index(conn: sqlite3.Connection) -> int:
    """Once every row is converted: the old index's blocks a chunk at a time, then the tables themselves."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (flows.LEGACY_FTS,)).fetchone()
    if exists is None:
        conn.execute("DROP TABLE flows_legacy")
        return 0
    data = f"{flows.LEGACY_FTS}_data"
    # Blocks 1 and 10 are the index's averages and structure: kept, so that FTS5 can still open
    # the table to drop it; every other block is a segment page nobody reads any more.
    deleted = conn.execute(
        f"DELETE FROM {data} WHERE id IN (SELECT id FROM {data} WHERE id > 10 LIMIT ?)", (INDEX_PAGES_PER_CHUNK,)
    ).rowcount
    if deleted:
        return 1
    docsize = f"{flows.LEGACY_FTS}_docsize"  # a row per flow: small rows, but a million of them
    deleted = conn.execute(
        f"DELETE FROM {docsize} WHERE id IN (SELECT id FROM {docsize} LIMIT ?)", (INDEX_PAGES_PER_CHUNK * 10,)
    ).rowcount
    if deleted:
        return 1
    conn.execute(f"DROP TABLE {flows.LEGACY_FTS}")
    return 1


def convert_all(
    conn: sqlite3.Connection, report: Callable[[int, int], None] | None = None, every_seconds: float = 5.0
) -> int:
    """Convert every old row and drop the old index, chunk after chunk; returns the rows converted.

    `report(converted, remaining)` is called every `every_seconds`. Stopping it at any point
    (Ctrl-C, kill) loses at most the chunk in progress, which the next run does again.
    """
    packer = flows.FlowPacker()
    converted, reported = 0, time.monotonic()
    while True:
        before = progress(conn).remaining
        if not convert_chunk(conn, packer):
            return converted
        converted += before - progress(conn).remaining
        if report and time.monotonic() - reported >= every_seconds:
            reported = time.monotonic()
            report(converted, progress(conn).remaining)
