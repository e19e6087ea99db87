"""storage/pg.py's translation of sqlite3 statements, and what messages may show of a URL."""

from __future__ import annotations

import pytest

from storage import pg


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://kr:hunter2@db:5432/kr", "postgresql://kr:***@db:5432/kr"),
        (
            "postgresql://kr@db/kr?sslmode=require&password=hunter2",
            "postgresql://kr@db/kr?sslmode=require&password=***",
        ),
        ("postgres://db/kr", "postgres://db/kr"),
    ],
)
def test_a_urls_password_is_never_shown(url, shown):
    assert pg.redact(url) == shown and "hunter2" not in pg.redact(url)


def pieces(sql: str) -> list[str]:
    return [p.decode() for p in pg.translate(sql).text]


def test_placeholders_outside_literals_only_and_percent_signs_kept():
    assert pieces("SELECT '?', \"a?\" FROM t WHERE x = ? AND y LIKE '10%'") == [
        "SELECT '?', \"a?\" FROM t WHERE x = ",
        " AND y LIKE '10%'",
    ]


def test_sqlite_idioms_become_postgresql_ones():
    ignore = pg.translate("INSERT OR IGNORE INTO flow_tags (tag, flow) VALUES (?, ?)")
    assert b"".join(ignore.text).decode() == "INSERT INTO flow_tags (tag, flow) VALUES (, ) ON CONFLICT DO NOTHING"
    upsert = "".join(
        pieces("INSERT INTO revisions (name, value) VALUES (?, 1) ON CONFLICT(name) DO UPDATE SET value = value + 1")
    )
    assert upsert.endswith('DO UPDATE SET value = "revisions".value + 1')
    returning = pg.translate("INSERT INTO audit_log (at, actor, action) VALUES (?, ?, ?)")
    assert returning.returns_id and b"".join(returning.text).endswith(b" RETURNING id")
    extremes = "".join(pieces("UPDATE t SET a = max(coalesce(a, 0), ?), b = max(b) WHERE instr(c, ?)"))
    assert extremes == "UPDATE t SET a = greatest(coalesce(a, 0), ), b = max(b) WHERE strpos(c, )"
    assert pg.translate("BEGIN IMMEDIATE").kind == "begin_immediate"
    assert pg.translate("PRAGMA busy_timeout = 10").kind == "pragma"
    with pytest.raises(Exception, match="INSERT OR REPLACE"):
        pg.translate("INSERT OR REPLACE INTO t (a) VALUES (?)")


def test_begin_immediate_is_one_writer_at_a_time_as_on_sqlite(postgres_url):
    import threading
    import time

    from storage import db

    db.ensure_database(postgres_url)
    first, second = pg.connect(postgres_url), pg.connect(postgres_url)
    first.execute("BEGIN IMMEDIATE")
    entered = threading.Event()

    def other_writer():
        second.execute("BEGIN IMMEDIATE")
        entered.set()
        second.rollback()

    thread = threading.Thread(target=other_writer)
    thread.start()
    time.sleep(0.5)  # the other writer is not let in while the first holds the lock...
    assert not entered.is_set()
    first.commit()
    assert entered.wait(10)  # ...and is as soon as it lets go
    thread.join()
    first.close()
    second.close()


def test_an_integrity_error_is_sqlites_and_rows_read_like_sqlite3_rows(postgres_url):
    import sqlite3

    from storage import db

    db.ensure_database(postgres_url)
    conn = pg.connect(postgres_url)
    with conn:
        conn.execute("INSERT INTO clients (name, created_at) VALUES (?, ?)", ("alice", 1.0))
    with pytest.raises(sqlite3.IntegrityError), conn:
        conn.execute("INSERT INTO clients (name, created_at) VALUES (?, ?)", ("alice", 2.0))
    row = conn.execute("SELECT id, name, enabled FROM clients WHERE name = ?", ("alice",)).fetchone()
    assert dict(row) == {"id": row[0], "name": "alice", "enabled": 1} and row["NAME"] == "alice"
    total, count = conn.execute("SELECT sum(enabled), count(*) FROM clients").fetchone()
    assert type(total) is int and type(count) is int  # not Decimal, as SQLite
    conn.close()
