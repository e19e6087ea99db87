"""PostgreSQL under storage/'s SQL: a connection that behaves like the part of sqlite3.Connection storage/ uses.

storage/'s modules are written against sqlite3 (placeholders `?`, rows by name and index,
`lastrowid`, implicit transactions, `BEGIN IMMEDIATE`, `INSERT OR IGNORE`, PRAGMAs). This
module gives them the same behaviour on PostgreSQL through psycopg 3, so that one module
serves both; where a translation would be fragile (full-text search, sizes) the module asks
`is_postgres(conn)` and runs SQL written for PostgreSQL.

Each statement is translated once and cached: the SQLite path never goes through here.
Errors are raised as sqlite3's own exception classes (IntegrityError, OperationalError), so
that the callers' `except sqlite3.…` clauses mean the same thing on both databases.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.adapt import Dumper, Loader, Transformer

log = logging.getLogger(__name__)

URL_SCHEMES = ("postgresql://", "postgres://")
# The one lock `BEGIN IMMEDIATE` takes on PostgreSQL (pg_advisory_xact_lock): what SQLite's
# database-wide write lock gives the code that asks for it, and no more.
WRITE_LOCK = 0x6B6579726F746F72  # "keyrotor"
MIGRATION_LOCK = WRITE_LOCK + 1
CONNECT_TIMEOUT_SECONDS = 5
SCHEMA_TABLE = "keyrotor_schema"


def is_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(URL_SCHEMES)


def redact(url: str) -> str:
    """The URL with its password replaced by ***: what logs and messages may show."""
    parts = urlsplit(url)
    query = re.sub(r"(?i)(^|&)(password|sslpassword)=[^&]*", r"\1\2=***", parts.query)
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class Row:
    """sqlite3.Row's behaviour: by index, by (case-insensitive) name, keys(), iteration, dict(row)."""

    __slots__ = ("_index", "_names", "_values")

    def __init__(self, names: tuple[str, ...], index: dict[str, int], values: Sequence[Any]) -> None:
        self._names = names
        self._index = index
        self._values = tuple(values)

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._index[key.lower()]]
            except KeyError:
                raise IndexError(f"No item with that key: {key}") from None
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Row):
            return NotImplemented
        return self._names == other._names and self._values == other._values

    def __hash__(self) -> int:
        return hash((self._names, self._values))

    def __repr__(self) -> str:
        return f"<Row {dict(zip(self._names, self._values, strict=True))!r}>"


def _row_factory(cursor: Any) -> Any:
    names = tuple(c.name for c in cursor.description) if cursor.description else ()
    index = {name.lower(): i for i, name in reversed(list(enumerate(names)))}  # the first of a name wins
    return lambda values: Row(names, index, values)


class _BoolAsInteger(Dumper):
    """Python booleans as 0/1, the way SQLite stores them in the INTEGER columns they go to."""

    def dump(self, obj: bool) -> bytes:
        return b"1" if obj else b"0"


class _NumericLoader(Loader):
    """numeric (what sum() of integers gives) as int when whole, else float: what SQLite returns."""

    def load(self, data: Any) -> int | float:
        text = bytes(data)
        if text.lstrip(b"-").isdigit():
            return int(text)
        return float(text)


# ------------------------------------------------------------------ translation


@dataclass(frozen=True)
class Statement:
    text: tuple[bytes, ...]  # the SQL in pieces, one placeholder between each two
    kind: str  # "dml", "read", "ddl", "begin", "begin_immediate", "commit", "rollback", "pragma"
    returns_id: bool = False  # RETURNING id added: the cursor's lastrowid
    sets_id: str | None = None  # an INSERT that gives ids itself: the table whose id sequence to move on
    pragma: str = ""


_LITERAL = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*")
_INSERT = re.compile(r"^\s*INSERT\s+(OR\s+(IGNORE|REPLACE)\s+)?INTO\s+\"?(\w+)\"?\s*(\(([^)]*)\))?", re.IGNORECASE)
_CODE_REWRITES = [
    (re.compile(r"\binstr\s*\(", re.IGNORECASE), "strpos("),
    (re.compile(r"\bAS\s+REAL\s*\)", re.IGNORECASE), "AS double precision)"),
]
_WHOLE_REWRITES = [
    ("CAST(strftime('%s', 'now') AS REAL)", "extract(epoch from now())::double precision"),
]


def _placeholders(sql: str) -> tuple[bytes, ...]:
    """The statement split at its `?` placeholders (outside string literals and identifiers):
    the values' literals go between the pieces (Connection._query)."""
    pieces: list[str] = [""]
    position = 0
    for match in _LITERAL.finditer(sql):
        _code_into(pieces, sql[position : match.start()])
        pieces[-1] += match.group(0)
        position = match.end()
    _code_into(pieces, sql[position:])
    return tuple(piece.encode() for piece in pieces)


def _code_into(pieces: list[str], code: str) -> None:
    first, *rest = _code(code).split("?")
    pieces[-1] += first
    pieces.extend(rest)


def _code(part: str) -> str:
    for pattern, replacement in _CODE_REWRITES:
        part = pattern.sub(replacement, part)
    return _scalar_extremes(part)


_EXTREME = re.compile(r"\b(max|min)\s*\(", re.IGNORECASE)


def _scalar_extremes(code: str) -> str:
    """SQLite's max(a, b) and min(a, b) of several arguments are PostgreSQL's greatest() and least()."""
    out, position = [], 0
    for match in _EXTREME.finditer(code):
        depth, end, comma = 1, match.end(), False
        while end < len(code) and depth:
            ch = code[end]
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif ch == "," and depth == 1:
                comma = True
            end += 1
        if comma and match.start() >= position:
            out.append(code[position : match.start()])
            out.append("greatest(" if match.group(1).lower() == "max" else "least(")
            position = match.end()
    out.append(code[position:])
    return "".join(out)


def _split_top(text: str, separator: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _qualify_update(sql: str, table: str, columns: frozenset[str]) -> str:
    """In ON CONFLICT … DO UPDATE SET, SQLite reads a bare column as the stored row's: PostgreSQL names the table."""
    match = re.search(r"\bDO\s+UPDATE\s+SET\b", sql, re.IGNORECASE)
    if match is None or not columns:  # not one of the schema's tables: written for PostgreSQL already
        return sql
    head, body = sql[: match.end()], sql[match.end() :]
    where = re.search(r"\b(WHERE|RETURNING)\b", body, re.IGNORECASE)
    tail = ""
    if where:
        body, tail = body[: where.start()], body[where.start() :]
    bare = re.compile(
        r"(?<![\w.\"])(" + "|".join(sorted(columns, key=len, reverse=True)) + r")\b(?!\s*\()", re.IGNORECASE
    )

    def qualify(expression: str) -> str:
        return bare.sub(lambda m: f'"{table}".{m.group(1)}', expression)

    assignments = []
    for assignment in _split_top(body):
        target, _, value = assignment.partition("=")
        assignments.append(f"{target}={qualify(value)}")
    returning = re.search(r"\bRETURNING\b", tail, re.IGNORECASE)
    if returning:
        return head + ",".join(assignments) + qualify(tail[: returning.start()]) + tail[returning.start() :]
    return head + ",".join(assignments) + qualify(tail)


@lru_cache(maxsize=4096)
def translate(sql: str) -> Statement:
    """One sqlite3 statement as PostgreSQL runs it; cached, so each distinct text is translated once."""
    head = sql.lstrip()[:24].upper()
    if head.startswith("PRAGMA"):
        return Statement((b"",), "pragma", pragma=sql.strip()[6:].strip().rstrip(";"))
    if head.startswith("BEGIN"):
        return Statement((b"BEGIN",), "begin_immediate" if "IMMEDIATE" in head or "EXCLUSIVE" in head else "begin")
    if head.startswith(("COMMIT", "END")):
        return Statement((b"COMMIT",), "commit")
    if head.startswith("ROLLBACK") and " TO " not in sql.upper():
        return Statement((b"ROLLBACK",), "rollback")
    for old, new in _WHOLE_REWRITES:
        sql = sql.replace(old, new)
    returns_id = False
    sets_id = None
    if head.startswith("INSERT"):
        match = _INSERT.match(sql)
        if match is None:
            raise sqlite3.OperationalError(f"keyrotor's PostgreSQL adapter cannot read this INSERT: {sql[:80]}")
        conflict = (match.group(2) or "").upper()
        table = match.group(3)
        columns = [c.strip().strip('"').lower() for c in (match.group(5) or "").split(",")]
        if conflict == "REPLACE":
            raise sqlite3.OperationalError("INSERT OR REPLACE has no PostgreSQL translation; use ON CONFLICT")
        if conflict:
            sql = sql[: match.start(1)] + sql[match.end(1) :]
            sql = sql.rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
        from storage import pg_schema

        if re.search(r"\bDO\s+UPDATE\s+SET\b", sql, re.IGNORECASE):
            sql = _qualify_update(sql, table, pg_schema.columns_of(table))
        if table in pg_schema.id_tables() and "RETURNING" not in sql.upper():
            if "ids from the sequence" in sql:
                pass  # nextval gave them: the sequence is past them already
            elif "id" in columns:
                sets_id = table
            else:
                sql = sql.rstrip().rstrip(";") + " RETURNING id"
                returns_id = True
        return Statement(_placeholders(sql), "dml", returns_id, sets_id)
    if head.startswith(("UPDATE", "DELETE", "REPLACE")):
        return Statement(_placeholders(sql), "dml")
    if head.startswith(("CREATE", "ALTER", "DROP")):
        return Statement(_placeholders(sql), "ddl")
    if head.startswith("WITH") and re.search(r"\b(INSERT|UPDATE|DELETE)\b", sql, re.IGNORECASE):
        return Statement(_placeholders(sql), "dml")
    return Statement(_placeholders(sql), "read")


# ------------------------------------------------------------------ the connection


def _as_sqlite_error(error: psycopg.Error) -> sqlite3.Error:
    """psycopg's error as the sqlite3 class that storage/'s callers catch for the same condition."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    mapped: sqlite3.Error
    if isinstance(error, psycopg.IntegrityError):
        mapped = sqlite3.IntegrityError(text)
    elif isinstance(error, psycopg.OperationalError | psycopg.ProgrammingError | psycopg.InterfaceError):
        mapped = sqlite3.OperationalError(text)
        mapped.sqlite_errorcode = sqlite3.SQLITE_IOERR if isinstance(error, psycopg.OperationalError) else 1  # type: ignore[attr-defined]
    elif isinstance(error, psycopg.DataError):
        mapped = sqlite3.DataError(text)
    else:
        mapped = sqlite3.DatabaseError(text)
    return mapped


class Cursor:
    """What conn.execute() returns: rows already read (psycopg's client-side cursor reads them all)."""

    def __init__(self, rows: list[Row], rowcount: int, lastrowid: int | None, description: Any) -> None:
        self._rows = rows
        self._at = 0
        self.rowcount = rowcount
        self.lastrowid = lastrowid
        self.description = description

    def fetchone(self) -> Row | None:
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchall(self) -> list[Row]:
        rows = self._rows[self._at :]
        self._at = len(self._rows)
        return rows

    def fetchmany(self, size: int = 1) -> list[Row]:
        rows = self._rows[self._at : self._at + size]
        self._at += len(rows)
        return rows

    def __iter__(self) -> Iterator[Row]:
        while (row := self.fetchone()) is not None:
            yield row

    def close(self) -> None:
        self._rows = []


_EMPTY = Cursor([], -1, None, None)


class Connection:
    """sqlite3.Connection's behaviour over one psycopg connection, opened on first use and
    opened again after the server went away (never inside a transaction: that one is lost)."""

    def __init__(self, url: str, readonly: bool = False) -> None:
        self.url = url
        self.readonly = readonly
        self._pg: psycopg.Connection[Any] | None = None
        self.in_transaction = False
        self.total_changes = 0
        self.row_factory = None  # accepted and ignored: rows are always sqlite3.Row-like
        self._literal: Any = None  # a value as an SQL literal, by the connection's adapters

    # The connection itself ----------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._pg is not None and not self._pg.closed and not self._pg.broken:
            return self._pg
        if self.in_transaction:
            self.in_transaction = False
            raise sqlite3.OperationalError("the connection to PostgreSQL was lost during a transaction")
        self._close_quietly()
        try:
            pg = psycopg.connect(
                self.url,
                autocommit=True,
                cursor_factory=psycopg.ClientCursor,
                row_factory=_row_factory,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                application_name="keyrotor",
            )
        except psycopg.Error as e:
            error = sqlite3.OperationalError(f"cannot connect to PostgreSQL at {redact(self.url)}: {_first_line(e)}")
            error.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN  # type: ignore[attr-defined]
            raise error from None
        pg.adapters.register_dumper(bool, _BoolAsInteger)
        pg.adapters.register_loader("numeric", _NumericLoader)
        self._literal = Transformer(pg).as_literal
        if self.readonly:
            pg.execute("SET default_transaction_read_only = on")
        self._pg = pg
        return pg

    def _close_quietly(self) -> None:
        if self._pg is not None:
            try:
                self._pg.close()
            except psycopg.Error:
                pass
            self._pg = None

    def close(self) -> None:
        if self.in_transaction:
            self.rollback()
        self._close_quietly()

    def getlimit(self, category: int) -> int:
        return 32767  # bind parameters per statement (PostgreSQL's protocol allows 65535)

    # Statements ---------------------------------------------------------------

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Cursor:
        statement = translate(sql)
        kind = statement.kind
        if kind == "pragma":
            return self._pragma(statement.pragma)
        if kind in ("begin", "begin_immediate"):
            self._begin(immediate=kind == "begin_immediate")
            return _EMPTY
        if kind == "commit":
            self.commit()
            return _EMPTY
        if kind == "rollback":
            self.rollback()
            return _EMPTY
        if kind == "dml" and not self.in_transaction:
            self._begin(immediate=False)
        pg = self._connection()
        try:
            cursor = pg.execute(self._query(statement.text, parameters))
            rows = cursor.fetchall() if cursor.description is not None else []
            rowcount = cursor.rowcount
            if statement.sets_id:
                self._move_sequence(pg, statement.sets_id)
        except psycopg.Error as e:
            raise self._failed(e) from None
        lastrowid = None
        if statement.returns_id:
            lastrowid = rows[-1][0] if rows else None
            rows = []
        if kind == "dml" and rowcount > 0:
            self.total_changes += rowcount
        return Cursor(rows, rowcount, lastrowid, cursor.description if rows else None)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]]) -> Cursor:
        statement = translate(sql)
        rows = list(seq_of_parameters)
        if not rows:
            return Cursor([], 0, None, None)
        if statement.kind == "dml" and not self.in_transaction:
            self._begin(immediate=False)
        pg = self._connection()
        rowcount = 0
        try:
            for parameters in rows:
                rowcount += max(0, pg.execute(self._query(statement.text, parameters)).rowcount)
            if statement.sets_id:
                self._move_sequence(pg, statement.sets_id)
        except psycopg.Error as e:
            raise self._failed(e) from None
        self.total_changes += rowcount
        return Cursor([], rowcount, None, None)

    def _query(self, pieces: tuple[bytes, ...], parameters: Sequence[Any]) -> bytes:
        """The statement with its values written in as literals, the way psycopg's client-side
        cursor does, without its parsing of the statement on every call (translate() split it once)."""
        if len(parameters) != len(pieces) - 1:
            raise sqlite3.ProgrammingError(
                f"Incorrect number of bindings supplied. The current statement uses {len(pieces) - 1},"
                f" and there are {len(parameters)} supplied."
            )
        if len(pieces) == 1:
            return pieces[0]
        literal = self._literal
        out = [pieces[0]]
        for value, piece in zip(parameters, pieces[1:], strict=True):
            out.append(literal(value))
            out.append(piece)
        return b"".join(out)

    def _move_sequence(self, pg: psycopg.Connection[Any], table: str) -> None:
        """After ids were given explicitly, the next generated one follows the highest (as SQLite's does)."""
        pg.execute(
            # Never backwards: another node may hold values taken from it that are not committed yet.
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
            f" greatest(coalesce(max(id), 0) + 1, nextval(pg_get_serial_sequence('{table}', 'id'))), false)"
            f" FROM {table}"
        )

    def _failed(self, error: psycopg.Error) -> sqlite3.Error:
        pg = self._pg
        if pg is not None and (pg.broken or pg.closed):
            self.in_transaction = False
            self._close_quietly()
        return _as_sqlite_error(error)

    # Transactions -------------------------------------------------------------

    def _begin(self, immediate: bool) -> None:
        if self.in_transaction:
            return
        pg = self._connection()
        try:
            pg.execute("BEGIN")
            self.in_transaction = True
            if immediate:
                pg.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        except psycopg.Error as e:
            raise self._failed(e) from None

    def commit(self) -> None:
        if not self.in_transaction:
            return
        self.in_transaction = False
        pg = self._pg
        if pg is None:
            raise sqlite3.OperationalError("the connection to PostgreSQL was lost during a transaction")
        try:
            pg.execute("COMMIT")
        except psycopg.Error as e:
            raise self._failed(e) from None

    def rollback(self) -> None:
        if not self.in_transaction:
            return
        self.in_transaction = False
        if self._pg is None:
            return
        try:
            self._pg.execute("ROLLBACK")
        except psycopg.Error:
            self._close_quietly()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            try:
                self.commit()
            except sqlite3.Error:
                self.rollback()
                raise
        else:
            self.rollback()

    # PRAGMAs ------------------------------------------------------------------

    def _pragma(self, pragma: str) -> Cursor:
        """The PRAGMAs storage/ uses: the schema version is a table; the rest mean nothing here."""
        name, _, value = pragma.partition("=")
        name = name.strip().lower()
        if name == "user_version":
            if value.strip():
                self.execute(f"UPDATE {SCHEMA_TABLE} SET version = ?", (int(value),))
                return _EMPTY
            return self.execute(f"SELECT version FROM {SCHEMA_TABLE}")
        if name == "database_list":
            return self.execute("SELECT 0 AS seq, 'main' AS name, current_database() AS file")
        return _EMPTY  # busy_timeout, synchronous, journal_*, wal_checkpoint, foreign_keys: PostgreSQL's own


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_postgres(conn: object) -> bool:
    return isinstance(conn, Connection)


def connect(url: str, readonly: bool = False) -> Connection:
    """A connection that opens on first use: the proxy starts even while PostgreSQL is down."""
    return Connection(url, readonly)
