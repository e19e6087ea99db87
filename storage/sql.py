"""Multi-row statements: a batch in a few statements instead of one per row.

The capture writer gives up the GIL around every statement, and while the event loop is
busy it waits to get it back each time; a few statements per batch keep its writes short.
"""

from __future__ import annotations

import sqlite3
from functools import lru_cache

# Rows per INSERT statement. The writer thread gives up the GIL around every statement it
# runs and, while the proxy's event loop is busy, waits up to the interpreter's switch
# interval (5 ms) to get it back: a statement per row made a saturated writer fall behind.
ROWS_PER_STATEMENT = 100


def insert_many(conn: sqlite3.Connection, head: str, rows: list, tail: str = "") -> None:
    """`head` VALUES (...), (...) `tail`, up to ROWS_PER_STATEMENT rows a statement, in order."""
    if not rows:
        return
    columns = len(rows[0])
    step = max(1, min(ROWS_PER_STATEMENT, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // columns))
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        conn.execute(f"{head} VALUES {placeholders(len(chunk), columns)} {tail}", [v for row in chunk for v in row])


@lru_cache(maxsize=256)
def placeholders(rows: int, columns: int) -> str:
    """ "(?, ?), (?, ?)" for rows=2, columns=2."""
    one = "(" + ", ".join("?" * columns) + ")"
    return ", ".join([one] * rows)
