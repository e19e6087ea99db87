"""The writer thread: batches, nothing queued is lost at shutdown, a locked database loses nothing silently."""

from __future__ import annotations

import sqlite3

from core.records import FlowRecord
from storage import capture_status, db, writer
from tests.conftest import wait_for


class Row:
    def __init__(self, n: int) -> None:
        self.n = n

    def to_record(self) -> FlowRecord:
        return FlowRecord(
            **{"flow_id": f"f{self.n}", "started_at": float(self.n), "method": "GET", "path": f"/v1/{self.n}"}
        )


class Broken:
    def to_record(self) -> FlowRecord:
        raise ValueError("unparseable")


def count(path) -> int:
    conn = db.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM flows").fetchone()[0]
    finally:
        conn.close()


def test_everything_queued_is_written_by_shutdown(database):
    path = database
    shared = writer.acquire(path)
    assert writer.acquire(path) is shared  # addons share one writer per database
    for n in range(2500):
        shared.put(Row(n))
    shared.put(Broken())  # one bad item must not cost the others their rows
    writer.release(shared)
    assert shared._thread.is_alive()  # still one user left
    writer.release(shared)
    assert not shared._thread.is_alive()
    assert count(path) == 2500


def test_rows_wait_while_another_connection_holds_the_write_lock(database, sqlite_only):
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another program's long write transaction
    shared = writer.acquire(database)
    try:
        for n in range(30):
            shared.put(Row(n))
        status = wait_for(
            lambda: (s := capture_status.read(database)).waiting == 30 and s,
            what="the status file to report 30 waiting flows",
        )
        assert status.error == "database is locked" and status.dropped == 0
    finally:
        holder.rollback()
        holder.close()
    wait_for(lambda: count(database) == 30, what="the waiting flows to be stored")
    writer.release(shared)
    status = capture_status.read(database)
    assert (status.waiting, status.failing_since, status.dropped) == (0, None, 0)


def test_beyond_the_backlog_the_oldest_rows_are_dropped_and_counted(database, sqlite_only):
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    shared = writer.acquire(database)
    shared.backlog_bytes = 10 * writer.ROW_OVERHEAD_BYTES  # room for ten small rows
    try:
        for n in range(25):
            shared.put(Row(n))
        wait_for(lambda: capture_status.read(database).dropped == 15, what="15 flows counted as dropped")
    finally:
        holder.rollback()
        holder.close()
    writer.release(shared)
    conn = sqlite3.connect(database)
    kept = [row[0] for row in conn.execute("SELECT flow_id FROM flows ORDER BY id")]
    conn.close()
    assert kept == [f"f{n}" for n in range(15, 25)]


class BigRow(Row):
    """A row with a body that does not compress: it takes real pages."""

    def to_record(self) -> FlowRecord:
        import os

        return FlowRecord(
            flow_id=f"f{self.n}",
            started_at=float(self.n),
            method="POST",
            path=f"/v1/{self.n}",
            response_body=os.urandom(6000).hex(),
        )


def test_a_full_disk_counts_what_it_drops_and_capture_resumes_when_space_returns(database, sqlite_only, monkeypatch):
    # SQLite's max_page_count makes the database "full" (SQLITE_FULL) with no disk tricks; it is a
    # setting of the writer's own connection, so it is applied there, before each write.
    pages: dict[str, int | None] = {"max": None}
    write = writer.Writer._write

    def write_within_the_limit(self, conn, batch, states):
        if pages["max"] is not None:
            conn.execute(f"PRAGMA max_page_count = {pages['max']}")
        return write(self, conn, batch, states)

    monkeypatch.setattr(writer.Writer, "_write", write_within_the_limit)
    conn = sqlite3.connect(database)
    pages["max"] = conn.execute("PRAGMA page_count").fetchone()[0] + 8  # room for a row or two
    conn.close()
    shared = writer.Writer(database, backlog_bytes=40 * (12_000 + writer.ROW_OVERHEAD_BYTES))
    shared.start()
    try:
        for n in range(100):
            shared.put(BigRow(n))
        full = wait_for(
            lambda: (s := capture_status.read(database)).dropped >= 50 and s.failing_since and s,
            what="the full database to be reported, and the rows beyond the backlog counted as dropped",
        )
        assert "full" in (full.error or "")
        pages["max"] = 1_000_000  # space returns
        wait_for(
            lambda: count(database) + shared.rows_dropped == 100 and not shared._pending,
            timeout=5,
            what="every kept row stored within seconds of the space returning",
        )
        status = wait_for(lambda: (s := capture_status.read(database)).failing_since is None and s, what="recovery")
        assert status.dropped == shared.rows_dropped and status.waiting == 0
        assert 0 < count(database) < 100
    finally:
        shared.stop()


def test_the_wal_is_truncated_once_a_long_reader_lets_go(database, sqlite_only, monkeypatch):
    monkeypatch.setattr(writer, "CHECKPOINT_SECONDS", 0.2)
    wal = database.with_name(database.name + "-wal")
    reader = sqlite3.connect(database, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM flows").fetchone()  # a read transaction held open: the WAL cannot be reset
    shared = writer.Writer(database)
    shared.start()
    try:
        for n in range(300):
            shared.put(BigRow(n))
        wait_for(lambda: count(database) == 300, what="300 rows")
        grown = wal.stat().st_size
        assert grown > 1_000_000
        reader.execute("COMMIT")
        wait_for(lambda: wal.stat().st_size == 0, timeout=5, what="the WAL to be checkpointed and truncated")
    finally:
        reader.close()
        shared.stop()
