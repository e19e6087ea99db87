"""Connections. Every process opens its own; only the writer thread writes in the proxy."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from storage import pg, schema

BUSY_TIMEOUT_MS = 5000

# Set by the composition roots (addons/runtime.py, monitor_ui/app.py, the CLI) when
# `storage.url` names a PostgreSQL database: every connection this process opens goes there.
# The path stays what secrets and the capture status file are kept beside.
_postgres_url: str | None = None


def use_postgres(url: str | None) -> None:
    """Keep this process's data in PostgreSQL at `url` ("" or None: the SQLite file at the path)."""
    global _postgres_url
    _postgres_url = url or None


def postgres_url() -> str | None:
    return _postgres_url


def where(path: str | Path) -> str:
    """Where this process's data is, as messages may name it: the path, or the URL without its password."""
    return pg.redact(_postgres_url) if _postgres_url is not None else str(path)


def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    """Open a connection with the pragmas every keyrotor connection needs."""
    if _postgres_url is not None or pg.is_url(path):
        return pg.connect(str(path) if pg.is_url(path) else _postgres_url, readonly)  # type: ignore[arg-type, return-value]
    return connect_sqlite(path, readonly)


def connect_sqlite(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    """The SQLite file at `path`, whatever storage.url says (`run.py storage copy` reads it)."""
    if readonly:
        conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if not readonly:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL, and much cheaper per commit
    return conn


class DatabaseUnusable(OSError):
    """The database cannot be opened for writing; the message is one sentence for the user."""


def ensure_database(path: str | Path) -> None:
    """Create the database file (mode 0600) and its directory if needed, and bring the schema up to date.

    Raises DatabaseUnusable when it cannot be written: read-only, on a read-only or full
    file system, in a directory keyrotor may not write to, or not a database at all.
    """
    if _postgres_url is not None or pg.is_url(path):
        ensure_postgres(str(path) if pg.is_url(path) else _postgres_url, None if pg.is_url(path) else Path(path))  # type: ignore[arg-type]
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatabaseUnusable(f"cannot create the directory {path.parent} for the database: {e.strerror}.") from None
    try:
        # Created here, before SQLite does it with the process's umask: captured bodies are
        # as private as the secrets beside them. SQLite gives -wal and -shm the same mode.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise DatabaseUnusable(f"cannot create the database {path}: {e.strerror}.") from None
    try:
        conn = connect(path)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            schema.migrate(conn)
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock: what the writer will need
            conn.rollback()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise DatabaseUnusable(unusable_reason(path, e)) from None


def ensure_postgres(url: str, beside: Path | None = None) -> None:
    """Bring the PostgreSQL database's schema up to date; `beside`'s directory holds the secrets files."""
    from storage import pg_schema

    if beside is not None:
        try:
            beside.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatabaseUnusable(f"cannot create the directory {beside.parent}: {e.strerror}.") from None
    conn = pg.connect(url)
    try:
        pg_schema.migrate(conn)
    except sqlite3.Error as e:
        raise DatabaseUnusable(f"the PostgreSQL database {pg.redact(url)} cannot be used: {e}") from None
    finally:
        conn.close()


def unusable_reason(path: Path, error: sqlite3.DatabaseError) -> str:
    text = str(error)
    if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
        why = "it is on a read-only file system"
    elif not os.access(path, os.W_OK):
        why = "the file is read-only for this user"
    elif not os.access(path.parent, os.W_OK):
        why = f"this user may not create files in {path.parent} (SQLite keeps -wal and -shm files beside it)"
    elif "not a database" in text:
        why = "the file is not a SQLite database"
    elif "locked" in text or "busy" in text:
        why = "another process holds a write lock on it"
    else:
        why = f"SQLite says: {text}"
    return f"the database {path} cannot be written: {why}."


def read_revision(conn: sqlite3.Connection, name: str) -> int:
    """A counter bumped by every admin change to `name` ("keys", "clients"); the proxy polls it."""
    row = conn.execute("SELECT value FROM revisions WHERE name = ?", (name,)).fetchone()
    return row[0] if row else 0


# Called with the name of every revision bumped in this process: with [redis] url, a publisher that
# tells every proxy node at once (storage/redis_shared.py RevisionPublisher); their poll is the fallback.
revision_announcers: list[Callable[[str], None]] = []


def bump_revision(conn: sqlite3.Connection, name: str) -> None:
    conn.execute(
        "INSERT INTO revisions (name, value) VALUES (?, 1) ON CONFLICT(name) DO UPDATE SET value = value + 1",
        (name,),
    )
    for announce in revision_announcers:
        announce(name)


class ConnectionRevisions:
    """core.ports.Revisions on a connection the caller owns: a reload reads them beside the data."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def read_all(self, names: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(read_revision(self.conn, name) for name in names)


def inserted_id(cursor: sqlite3.Cursor) -> int:
    """The id of the row an INSERT on `cursor` just made."""
    if cursor.lastrowid is None:  # only before any INSERT on this cursor
        raise sqlite3.InterfaceError("no row was inserted")
    return cursor.lastrowid


class PolledRevisions:
    """core.ports.Revisions for a database across a network (PostgreSQL): a thread of its own reads
    them every POLL_SECONDS; the event loop's read_all only takes the last values read."""

    POLL_SECONDS = 0.1

    def __init__(self, path: str | Path) -> None:
        import threading

        self._path = path
        self._names: tuple[str, ...] = ()
        self._values: tuple[int, ...] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keyrotor-revisions", daemon=True)
        self._thread.start()

    def read_all(self, names: tuple[str, ...]) -> tuple[int, ...] | None:
        if names != self._names:
            self._names, self._values = names, None  # the thread reads these next
        return self._values

    def _run(self) -> None:
        conn = connect(self._path)
        try:
            while not self._stop.wait(self.POLL_SECONDS):
                names = self._names
                if not names:
                    continue
                try:
                    self._values = tuple(read_revision(conn, name) for name in names)
                except sqlite3.Error:
                    self._values = None  # unreachable for now: the proxy goes on with what it has
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class RevisionReader:
    """core.ports.Revisions on a connection of its own, for the proxy's poll on the event loop."""

    def __init__(self, path: str | Path) -> None:
        self._conn = connect(path)
        # Read on the loop itself: a one-row read takes microseconds and, with WAL and no busy
        # wait, can never block; a thread hand-off every poll would cost more than the read.
        self._conn.execute("PRAGMA busy_timeout = 0")

    def read_all(self, names: tuple[str, ...]) -> tuple[int, ...] | None:
        try:
            found = dict(
                self._conn.execute(
                    f"SELECT name, value FROM revisions WHERE name IN ({','.join('?' * len(names))})", names
                ).fetchall()
            )
        except sqlite3.OperationalError:
            return None  # busy right now
        return tuple(found.get(name, 0) for name in names)

    def close(self) -> None:
        self._conn.close()
