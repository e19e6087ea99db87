"""`run.py storage copy --to postgresql://…`: an SQLite database's rows into PostgreSQL, resumable.

Every table is copied in SQLite's rowid order, CHUNK rows per PostgreSQL transaction, and
each transaction also records the last rowid it copied (table keyrotor_copy): run again
after an interruption, the copy goes on after the last committed chunk. Rows keep their ids
(flows, keys, blobs and compression dictionaries refer to each other by id). Values are
copied as stored: upstream keys stay encrypted (nothing here decrypts), bodies stay packed
and compressed. Each flow's full-text entry is made from its unpacked texts as it is copied.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from storage import conversion, flows, pg, pg_schema

CHUNK = 1000  # rows per PostgreSQL transaction
FLOWS_CHUNK = 200  # flows carry their bodies
PROGRESS_TABLE = "keyrotor_copy"


class CopyRefused(Exception):
    """The copy cannot start; the message is one sentence for the user."""


@dataclass
class Copied:
    table: str
    rows: int  # copied by this run
    total: int  # in the source


def _columns(source: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in source.execute(f'PRAGMA table_info("{table}")')]


def _started(target: pg.Connection) -> bool:
    return bool(_one(target, "SELECT to_regclass(?) IS NOT NULL", (PROGRESS_TABLE,)))


def _one(target: pg.Connection, sql: str, params: tuple = ()) -> Any:
    row = target.execute(sql, params).fetchone()
    assert row is not None, sql
    return row[0]


def _prepare(target: pg.Connection, tables: list[str]) -> None:
    """On a first run: the target must hold nothing but what the migrations put there, which goes."""
    if _started(target):
        return
    for table in ("flows", "upstream_keys", "client_keys", "audit_log"):
        if _one(target, f'SELECT count(*) FROM "{table}"'):
            raise CopyRefused(
                f"the PostgreSQL database already holds {table}: copy into an empty database"
                " (or one a previous copy started)"
            )
    with target:
        target.execute("BEGIN")
        for table in reversed(tables):  # what refers to others first
            target.execute(f'DELETE FROM "{table}"')
        target.execute(f"CREATE TABLE {PROGRESS_TABLE} (name TEXT PRIMARY KEY, last_rowid BIGINT NOT NULL)")


def copy_database(
    source: sqlite3.Connection, target: pg.Connection, report: Callable[[Copied], None] | None = None
) -> list[Copied]:
    """Copy every table of `source` (an SQLite database at the latest schema) into `target`."""
    if conversion.pending(source):
        raise CopyRefused("flows stored before compression are left: run `run.py storage migrate` first")
    pg_schema.migrate(target)
    snapshot = pg_schema.latest()
    tables = list(snapshot.tables)
    _prepare(target, tables)
    done = []
    for table in tables:
        copied = _copy_table(source, target, table, report)
        done.append(copied)
    return done


def _copy_table(
    source: sqlite3.Connection, target: pg.Connection, table: str, report: Callable[[Copied], None] | None
) -> Copied:
    columns = _columns(source, table)
    total = source.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    row = target.execute(f"SELECT last_rowid FROM {PROGRESS_TABLE} WHERE name = ?", (table,)).fetchone()
    last = row[0] if row else 0
    copied = Copied(table, 0, total)
    head = f'INSERT INTO "{table}" (' + ", ".join(f'"{c}"' for c in columns) + ")"
    chunk = FLOWS_CHUNK if table == "flows" else CHUNK
    marks = "(" + ", ".join("?" * len(columns)) + ")"
    while True:
        rows = source.execute(
            f'SELECT rowid AS rowid_, * FROM "{table}" WHERE rowid > ? ORDER BY rowid LIMIT ?', (last, chunk)
        ).fetchall()
        if not rows:
            break
        values = [tuple(r[c] for c in columns) for r in rows]
        with target:
            target.execute("BEGIN")
            target.execute(f"{head} VALUES {', '.join([marks] * len(values))}", [v for r in values for v in r])
            if table == "flows":
                _index(source, target, rows)
            last = rows[-1]["rowid_"]
            target.execute(
                f"INSERT INTO {PROGRESS_TABLE} (name, last_rowid) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET last_rowid = excluded.last_rowid",
                (table, last),
            )
        copied.rows += len(rows)
        if report:
            report(copied)
    return copied


def _index(source: sqlite3.Connection, target: pg.Connection, rows: list[sqlite3.Row]) -> None:
    """The copied flows' full-text entries, from their unpacked texts (the same words FTS5 indexed)."""
    known: dict[int, str] = {}
    documents = []
    for row in rows:
        plain = flows.unpack_row(source, row, known)
        texts = (plain["path"], plain["model"], plain["request_body"], plain["response_body"])
        documents.append((row["id"], flows.document_of(texts)))
    target.execute(
        f"INSERT INTO flows_fts (id, document) VALUES {', '.join(['(?, ?)'] * len(documents))}",
        [v for d in documents for v in d],
    )
