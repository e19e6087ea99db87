"""The writer thread: batches, nothing queued is lost at shutdown, a locked database loses nothing silently."""

from __future__ import annotations

import sqlite3

from core.records import FlowRecord
from storage import capture_status, writer
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
    conn = sqlite3.connect(path)
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


def test_rows_wait_while_another_connection_holds_the_write_lock(database):
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


def test_beyond_the_backlog_the_oldest_rows_are_dropped_and_counted(database):
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
