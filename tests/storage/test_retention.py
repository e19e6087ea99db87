"""Retention: the writer purges old and surplus flows in chunks, without losing new ones."""

from __future__ import annotations

import time

from core.records import FlowRecord
from storage import db, flows, writer
from tests.conftest import wait_for


class Row:
    def __init__(self, n: int, started_at: float) -> None:
        self.n, self.started_at = n, started_at

    def to_record(self) -> FlowRecord:
        return FlowRecord(
            **{
                "flow_id": f"f{self.n}",
                "started_at": self.started_at,
                "method": "GET",
                "path": f"/v1/models/{self.n}",
                "status": 200,
            }
        )


def count(path) -> int:
    conn = db.connect(path, readonly=True)
    try:
        return flows.count_flows(conn)
    finally:
        conn.close()


def test_old_rows_go_and_new_rows_stay(database, monkeypatch):
    monkeypatch.setattr(flows, "PURGE_CHUNK", 7)  # several chunks
    w = writer.acquire(database)
    try:
        now = time.time()
        for n in range(30):
            w.put(Row(n, now - 40 * 86400))  # 40 days old
        for n in range(30, 35):
            w.put(Row(n, now))
        wait_for(lambda: count(database) == 35, what="35 rows written")
        w.retention = writer.Retention(keep_days=30)
        w._next_purge = 0  # due now
        w.put(Row(35, now))
        wait_for(lambda: count(database) == 6, what="the 30 old rows purged")
        conn = db.connect(database, readonly=True)
        assert [r["flow_id"] for r in flows.recent_flows(conn, 10)] == [f"f{n}" for n in range(35, 29, -1)]
        assert conn.execute("SELECT count(*) FROM flows_fts").fetchone()[0] == 6  # the index follows
        conn.close()
    finally:
        writer.release(w)


def test_max_rows_keeps_the_newest(database, monkeypatch):
    monkeypatch.setattr(flows, "PURGE_CHUNK", 4)
    w = writer.acquire(database)
    try:
        now = time.time()
        for n in range(25):
            w.put(Row(n, now + n))
        wait_for(lambda: count(database) == 25, what="25 rows written")
        w.retention = writer.Retention(max_rows=10)
        w._next_purge = 0
        w.put(Row(25, now + 25))
        wait_for(lambda: count(database) == 10, what="all but the newest 10 purged")
        assert w.rows_purged == 16
    finally:
        writer.release(w)


def test_a_purged_flows_tags_go_with_it_and_the_tag_filter_finds_the_rest(conn):
    now = time.time()
    records = [
        FlowRecord(f"t{i}", now - 100 + i, "POST", "/v1/chat/completions", status=200, tags="a,b" if i % 2 else "a")
        for i in range(6)
    ]
    with conn:
        flows.insert_batch(conn, records)
    assert conn.execute("SELECT count(*) FROM flow_tags").fetchone()[0] == 9
    assert flows.purge_chunk(conn, None, keep_rows=2) == 4
    assert sorted(tuple(r) for r in conn.execute("SELECT tag, flow FROM flow_tags")) == [("a", 5), ("a", 6), ("b", 6)]
    found = flows.search_flows(conn, flows.FlowFilter(tag="b"), 10)
    assert [r["id"] for r in found] == [6]
