"""The writer thread: batches, and nothing queued is lost at shutdown."""

from __future__ import annotations

import sqlite3

from core.records import FlowRecord
from storage import writer


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
