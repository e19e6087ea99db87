"""What the workers of `run.py proxy --workers N` share, in a small SQLite file beside the database.

`<database>.workers` holds the state that must be exact or quick across workers: client
limit counters (moving windows, calendar totals, requests in flight, budget holds) and the
events by which one worker tells the others what upstream taught it (a key invalid,
exhausted or cooling, a key resting for a model, a pool resting). It is a file of its own,
not tables in the database, so that admitting a request (a short write transaction) never
waits behind capture's batch commits; it is rebuilt by the supervisor at each start
(`prepare`), seeded with the totals the database kept, and worker 0 copies what changed
back into the database every FLUSH_SECONDS (the CLI and the UI read spend there, as with
one process). Captured flows, key states and object owners still go to the database, each
worker through its own writer thread.

- SharedCounters (core.ports.Counters): each call is SQL on this file; `atomic()` makes a
  Governor's whole read-and-add one `BEGIN IMMEDIATE` transaction, so a limit is exact
  whichever worker a request reaches (RPM 5 lets exactly 5 through).
- SharedHolds: the Governor's budget holds (`reserved`) as every worker sees them.
- WorkerLink: one thread per worker that writes the events this worker learns at once and
  reads the others' every POLL_SECONDS, handing them to the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.limits import CountersUnavailable
from core.models import KeyState, KeyStateChange
from core.pool import Rested
from core.ports import PoolStateSink
from storage import counters as sqlite_counters
from storage import db

log = logging.getLogger(__name__)

POLL_SECONDS = 0.02  # how often a worker reads the others' events: a rest reaches them within ~this
STRATEGY_CHECK_SECONDS = 1.0  # without least_used, how often a worker looks whether it now has it
FLUSH_SECONDS = 1.0  # worker 0 copies counters back into the database this often (spend in the UI)
BUSY_TIMEOUT_MS = 5000  # the link's thread; the counters, on the event loop, wait COUNTERS_BUSY_TIMEOUT_MS at most
COUNTERS_BUSY_TIMEOUT_MS = 1000  # then the request is refused (limits_unavailable) rather than the loop held longer
MOVING_KEEP_SECONDS = 3600  # as storage/counters.py: no moving window keyrotor uses is longer
EVENTS_KEEP_SECONDS = 60.0
PERIOD_ADD = (
    "INSERT INTO periods (name, value, dirty) VALUES (?, ?, 1)"
    " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value, dirty = 1"
)

SCHEMA = (
    "CREATE TABLE windows (id INTEGER PRIMARY KEY, name TEXT NOT NULL, at REAL NOT NULL, amount REAL NOT NULL,"
    " flushed REAL NOT NULL DEFAULT 0)",
    "CREATE INDEX windows_name_at ON windows (name, at)",
    # Each window's running total: the entries after `pruned_at` summed (what moving_total reads in
    # O(1), rather than summing a minute of entries: at 300 requests a second, 18,000 rows a request).
    "CREATE TABLE window_totals (name TEXT PRIMARY KEY, total REAL NOT NULL, pruned_at REAL NOT NULL)",
    "CREATE TABLE periods (name TEXT PRIMARY KEY, value REAL NOT NULL, dirty INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE gauges (worker INTEGER NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,"
    " PRIMARY KEY (worker, name))",
    "CREATE TABLE in_flight (worker INTEGER NOT NULL, key_id INTEGER NOT NULL, value INTEGER NOT NULL,"
    " PRIMARY KEY (worker, key_id))",
    "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, worker INTEGER NOT NULL, run INTEGER NOT NULL,"
    " kind TEXT NOT NULL, data TEXT NOT NULL, at REAL NOT NULL)",
)


class LaterAmounts:
    """Calendar amounts added outside a decision (spend no admission weighs), by counter name, for a
    link's thread to send in one write: the event loop adds, the thread takes (and gives back what a
    failed write did not deliver). Shared by the workers' and Redis's counters."""

    def __init__(self) -> None:
        self._amounts: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, name: str, amount: float) -> bool:
        """Whether these are the first amounts since the last take (the thread may want waking)."""
        with self._lock:
            first = not self._amounts
            self._amounts[name] = self._amounts.get(name, 0.0) + amount
        return first

    def of(self, name: str) -> float:
        with self._lock:
            return self._amounts.get(name, 0.0)

    def take(self) -> list[tuple[str, float]]:
        with self._lock:
            taken = list(self._amounts.items())
            self._amounts.clear()
        return taken

    def give_back(self, amounts: list[tuple[str, float]]) -> None:
        with self._lock:
            for name, amount in amounts:
                self._amounts[name] = self._amounts.get(name, 0.0) + amount


def take_all(items: queue.SimpleQueue, wait: float) -> list[tuple[str, Any]]:
    """What a link's queue holds, waiting up to `wait` for the first item (None, a stop's wake-up, dropped)."""
    taken = []
    try:
        item = items.get(timeout=wait) if wait > 0 else items.get_nowait()
        while True:
            if item is not None:
                taken.append(item)
            item = items.get_nowait()
    except queue.Empty:
        pass
    return taken


# Workers share through the <database>.workers SQLite file or through Redis; PostgreSQL alone has neither.
NEED_REDIS = (
    "proxy.workers above 1 with storage.url (PostgreSQL) needs redis.url, through which the workers share"
    " limits and key states: set it, or run one worker per node (docs/postgresql.md)."
)


class NotPrepared(ValueError):
    """The shared file was not made by a supervisor (cli/workers.py): the message says what to run."""


def path_of(db_path: str | Path) -> Path:
    return Path(f"{db_path}.workers")


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the shared file: autocommit (transactions are explicit), WAL, no fsync.

    The file is rebuilt at each start, so a machine crash that loses its last commits loses
    nothing the database does not have; a killed worker loses nothing committed."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    return conn


def prepare(db_path: str | Path, workers: int) -> Path:
    """A fresh shared file for `workers` workers, seeded with the counts the database kept (the supervisor's)."""
    path = path_of(db_path)
    for suffix in ("", "-wal", "-shm"):
        with suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    conn = connect(path)
    main = db.connect(db_path, readonly=True)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for statement in SCHEMA:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO periods (name, value) VALUES (?, ?)",
            main.execute("SELECT name, value FROM limit_counters").fetchall(),
        )
        # A restored second's amount leaves the window at the end of that second (storage/counters.py);
        # flushed = amount: it is in the database already.
        conn.executemany(
            "INSERT INTO windows (name, at, amount, flushed) VALUES (?, ?, ?, ?)",
            [
                (name, second + 1.0, amount, amount)
                for name, second, amount in main.execute(
                    "SELECT name, second, amount FROM limit_windows WHERE second > ?",
                    (int(time.time()) - MOVING_KEEP_SECONDS,),
                )
            ],
        )
        conn.execute(
            "INSERT INTO window_totals (name, total, pruned_at) SELECT name, sum(amount), 0 FROM windows GROUP BY name"
        )
        conn.execute("COMMIT")
    finally:
        main.close()
        conn.close()
    log.debug("shared state for %d workers in %s", workers, path)
    return path


class SharedCounters:
    """core.ports.Counters over the shared file, for one worker: exact across workers.

    Called on the event loop: each call is a short SQL statement on a small file that only
    admissions and settlements write (microseconds to a millisecond; a concurrent admission
    in another worker is waited for, never capture). The Governor wraps each decision in
    `atomic()`, one BEGIN IMMEDIATE transaction taken at its first read: its reads and adds
    cannot interleave with another worker's.
    """

    def __init__(self, path: Path, worker: int) -> None:
        self.path = path
        self.worker = worker
        self.conn = connect(path)
        if not self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'gauges'").fetchone():
            self.conn.close()
            raise NotPrepared(
                f"{path} is not ready: workers share it once their supervisor made it; start them with"
                " `run.py proxy --workers N` rather than setting proxy_workers on mitmdump by hand."
            )
        self.conn.execute(f"PRAGMA busy_timeout = {COUNTERS_BUSY_TIMEOUT_MS}")
        self._depth = 0
        self._begun = False
        # Calendar amounts added outside a decision (spend no admission weighs: see period_add),
        # written by the WorkerLink's thread within POLL_SECONDS; counted here at once.
        self._later = LaterAmounts()
        # What a killed run of this worker held (requests in flight, budget holds) ended with it.
        self.conn.execute("DELETE FROM gauges WHERE worker = ?", (worker,))

    @contextmanager
    def atomic(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        except BaseException:
            if self._depth == 1 and self._begun:
                with suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            raise
        else:
            if self._depth == 1 and self._begun:
                try:
                    self.conn.execute("COMMIT")
                except sqlite3.Error as e:
                    with suppress(sqlite3.Error):
                        self.conn.execute("ROLLBACK")
                    raise CountersUnavailable(f"{self.path.name}: {e}") from e
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._begun = False

    def _sql(self, statement: str, params: tuple = ()) -> sqlite3.Cursor:
        try:
            if self._depth and not self._begun:
                self.conn.execute("BEGIN IMMEDIATE")
                self._begun = True
            return self.conn.execute(statement, params)
        except sqlite3.Error as e:  # busy past the timeout, disk full: the Governor refuses rather than guess
            raise CountersUnavailable(f"{self.path.name}: {e}") from e

    def moving_total(self, name: str, window_seconds: float, now: float) -> tuple[float, float | None]:
        """The window's running total, moved on to `now`: only the entries that left it since are summed.

        A name is always read with the same window (as storage/counters.py's prune assumes). Within
        a decision (`atomic()`) the running total is moved on for the next reader; outside one it is
        only computed. A caller whose `now` is a little behind another worker's (it took its time
        before its transaction) adds back the entries the other one moved past: exact either way."""
        cutoff = now - window_seconds
        oldest = self._sql("SELECT min(at) FROM windows WHERE name = ? AND at > ?", (name, cutoff)).fetchone()[0]
        row = self._sql("SELECT total, pruned_at FROM window_totals WHERE name = ?", (name,)).fetchone()
        if row is None:
            return 0.0, oldest
        total, pruned_at = row
        if cutoff > pruned_at:
            total -= self._sum_between(name, pruned_at, cutoff)
            if oldest is None:
                total = 0.0  # an empty window: no float dust carried on
            if self._depth:
                self._sql("UPDATE window_totals SET total = ?, pruned_at = ? WHERE name = ?", (total, cutoff, name))
        elif cutoff < pruned_at:
            total += self._sum_between(name, cutoff, pruned_at)
        return float(total), oldest

    def _sum_between(self, name: str, after: float, until: float) -> float:
        return float(
            self._sql(
                "SELECT coalesce(sum(amount), 0) FROM windows WHERE name = ? AND at > ? AND at <= ?",
                (name, after, until),
            ).fetchone()[0]
        )

    def moving_add(self, name: str, amount: float, now: float) -> object:
        entry = self._sql("INSERT INTO windows (name, at, amount) VALUES (?, ?, ?)", (name, now, amount)).lastrowid
        self._sql(
            "INSERT INTO window_totals (name, total, pruned_at) VALUES (?, ?, 0) ON CONFLICT (name) DO UPDATE"
            " SET total = total + excluded.total WHERE pruned_at < ?",
            (name, amount, now),
        )
        return entry

    def moving_adjust(self, name: str, entry: object, amount: float) -> None:
        row = self._sql("SELECT at, amount FROM windows WHERE id = ? AND name = ?", (entry, name)).fetchone()
        if row is None:
            return
        at, before = row
        self._sql("UPDATE windows SET amount = ? WHERE id = ?", (amount, entry))
        self._sql(
            "UPDATE window_totals SET total = total + ? WHERE name = ? AND pruned_at < ?", (amount - before, name, at)
        )

    def period_total(self, name: str) -> float:
        row = self._sql("SELECT value FROM periods WHERE name = ?", (name,)).fetchone()
        return (float(row[0]) if row else 0.0) + self._later.of(name)

    def period_add(self, name: str, amount: float) -> None:
        """Inside a decision (`atomic()`), at once. Outside one, the Governor settles the spend of a
        client without budget, holds or limits, which no admission weighs: it goes with the link's
        next write (a transaction per request cost a worker 5 % of its CPU), within POLL_SECONDS."""
        if not self._depth:
            self._later.add(name, amount)
            return
        self._sql(PERIOD_ADD, (name, amount))

    def take_later(self) -> list[tuple[str, float]]:
        """The calendar amounts added outside decisions since the last call (the WorkerLink writes them)."""
        return self._later.take()

    def give_back(self, amounts: list[tuple[str, float]]) -> None:
        """Amounts a failed write did not save: written with the next ones."""
        self._later.give_back(amounts)

    def gauge(self, name: str) -> int:
        return int(self._level(name))

    def gauge_add(self, name: str, delta: int) -> None:
        self._raise_own(name, delta)

    # Gauges and holds: each worker's own row, summed when read (a restarted worker drops its own).

    def _level(self, name: str) -> float:
        return float(self._sql("SELECT coalesce(sum(value), 0) FROM gauges WHERE name = ?", (name,)).fetchone()[0])

    def _own(self, name: str) -> float:
        row = self._sql("SELECT value FROM gauges WHERE worker = ? AND name = ?", (self.worker, name)).fetchone()
        return float(row[0]) if row else 0.0

    def _raise_own(self, name: str, delta: float) -> None:
        changed = self._sql(
            "UPDATE gauges SET value = max(0, value + ?) WHERE worker = ? AND name = ?", (delta, self.worker, name)
        ).rowcount
        if not changed and delta > 0:
            self._sql("INSERT INTO gauges (worker, name, value) VALUES (?, ?, ?)", (self.worker, name, delta))

    def start(self) -> None:
        """Nothing to run: calls write at once, or the WorkerLink writes what they leave it."""

    def stop(self) -> None:
        later = self.take_later()  # what came after the link's last write
        if later:
            try:
                self.conn.executemany(PERIOD_ADD, later)
            except sqlite3.Error:
                log.exception("the last spend of this worker could not be written")
        self.conn.close()


class SharedHolds(MutableMapping[str, float]):
    """core.limits.Governor.reserved across workers: what requests in flight hold of each budget.

    The Governor reads a total and writes the new total, inside its `atomic()` decision; the
    total is every worker's holds summed, and a write changes this worker's share only (by
    the difference), so a hold is released by the worker that took it.
    """

    PREFIX = "hold:"

    def __init__(self, counters: SharedCounters) -> None:
        self._counters = counters

    def __getitem__(self, name: str) -> float:
        value = self._counters._level(self.PREFIX + name)
        if value <= 0:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: float) -> None:
        self._counters._raise_own(self.PREFIX + name, value - self._counters._level(self.PREFIX + name))

    def __delitem__(self, name: str) -> None:
        # Nothing is held any more, anywhere (the Governor drops float dust): this worker's share goes.
        own = self._counters._own(self.PREFIX + name)
        self._counters._raise_own(self.PREFIX + name, -own)

    def __iter__(self) -> Iterator[str]:
        rows = self._counters._sql(
            "SELECT name FROM gauges WHERE name LIKE 'hold:%' GROUP BY name HAVING sum(value) > 0"
        ).fetchall()
        return iter([row[0][len(self.PREFIX) :] for row in rows])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class WorkerLink:
    """One worker's thread on the shared file: what it learns goes out at once, what the others learnt comes in.

    `publish_state` and `publish_rests` are called on the event loop and only queue; the
    thread writes each event as it comes, and reads the others' every POLL_SECONDS, giving
    them to `deliver` on the loop (`call_soon_threadsafe`). Worker 0 also copies the
    counters back into the database every FLUSH_SECONDS and when it stops.
    """

    def __init__(self, path: Path, db_path: Path, worker: int) -> None:
        self.path = path
        self.db_path = db_path
        self.worker = worker
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.deliver: Callable[[list[KeyStateChange | tuple[int, Rested]]], None] | None = None
        self.deliver_in_flight: Callable[[dict[int, int]], None] | None = None
        self.loop: Any = None  # the asyncio loop `deliver` runs on
        # Every event kept (the last EVENTS_KEEP_SECONDS) is read at start: a worker that replaces a dead
        # one learns the rests still running, its predecessor's included. Its own are those of this run.
        self._seen = 0
        self._run_id = secrets.randbits(62)  # this run of the worker (a replacement has another)
        self._in_flight: dict[int, int] | None = None  # what this worker last wrote (None: nothing yet)
        self.counters: SharedCounters | None = None  # whose spend outside decisions this thread writes
        self._elsewhere: dict[int, int] = {}  # what the others had, as last delivered

    # ------------------------------------------------------------------ on the loop

    def publish_state(self, change: KeyStateChange) -> None:
        self._queue.put(("state", asdict(change)))

    def publish_rests(self, group_id: int, rests: list[Rested]) -> None:
        for rest in rests:
            self._queue.put(("rest", {"group_id": group_id, **asdict(rest)}))

    def publish_in_flight(self, counts: dict[int, int]) -> None:
        """This worker's requests in flight by key (least_used); written with the next poll if they changed."""
        self._queue.put(("in_flight", counts))

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        conn = connect(self.path)
        try:
            conn.execute("DELETE FROM in_flight WHERE worker = ?", (self.worker,))  # a killed run's requests ended
        finally:
            conn.close()
        self._thread = threading.Thread(target=self._run, name="keyrotor-workers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        conn = connect(self.path)
        main = db.connect(self.db_path) if self.worker == 0 else None
        next_poll = next_flush = time.monotonic()
        try:
            while not self._stop.is_set():
                outgoing = take_all(self._queue, max(0.0, next_poll - time.monotonic()))
                try:
                    self._write_later(conn)
                    if outgoing:
                        self._write(conn, outgoing)
                    if time.monotonic() >= next_poll:
                        next_poll = time.monotonic() + POLL_SECONDS
                        self._read(conn)
                    if main is not None and time.monotonic() >= next_flush:
                        next_flush = time.monotonic() + FLUSH_SECONDS
                        flush(conn, main, time.time())
                except sqlite3.Error:
                    log.exception("sharing state with the other workers failed; retrying")
                    time.sleep(POLL_SECONDS)
            leftover = take_all(self._queue, 0)
            if leftover:
                self._write(conn, leftover)
            self._write_later(conn)
            if main is not None:
                flush(conn, main, time.time())
        except sqlite3.Error:
            log.exception("the last state shared with the other workers may be lost")
        finally:
            conn.close()
            if main is not None:
                main.close()

    def _write_later(self, conn: sqlite3.Connection) -> None:
        """The spend this worker's counters left for this thread (SharedCounters.period_add)."""
        later = self.counters.take_later() if self.counters is not None else []
        if not later:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(PERIOD_ADD, later)
            conn.execute("COMMIT")
        except sqlite3.Error:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            assert self.counters is not None
            self.counters.give_back(later)
            raise

    def _write(self, conn: sqlite3.Connection, events: list[tuple[str, Any]]) -> None:
        now = time.time()
        counts = [data for kind, data in events if kind == "in_flight"]
        events = [(kind, data) for kind, data in events if kind != "in_flight"]
        in_flight: dict[int, int] | None = counts[-1] if counts and counts[-1] != self._in_flight else None
        if not events and in_flight is None:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO events (worker, run, kind, data, at) VALUES (?, ?, ?, ?, ?)",
                [(self.worker, self._run_id, kind, json.dumps(data), now) for kind, data in events],
            )
            if in_flight is not None:
                conn.execute("DELETE FROM in_flight WHERE worker = ?", (self.worker,))
                conn.executemany(
                    "INSERT INTO in_flight (worker, key_id, value) VALUES (?, ?, ?)",
                    [(self.worker, key_id, value) for key_id, value in in_flight.items()],
                )
                self._in_flight = in_flight
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _read(self, conn: sqlite3.Connection) -> None:
        if self.deliver_in_flight is not None and self._in_flight is not None:  # least_used: this one tells too
            elsewhere = dict(
                conn.execute(
                    "SELECT key_id, sum(value) FROM in_flight WHERE worker != ? GROUP BY key_id", (self.worker,)
                ).fetchall()
            )
            if elsewhere != self._elsewhere and self.loop is not None:
                self._elsewhere = elsewhere
                with suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(self.deliver_in_flight, elsewhere)
        rows = conn.execute("SELECT id, run, kind, data FROM events WHERE id > ? ORDER BY id", (self._seen,)).fetchall()
        if not rows:
            return
        self._seen = rows[-1][0]
        theirs = [learnt(kind, json.loads(data)) for _, run, kind, data in rows if run != self._run_id]
        if theirs and self.deliver is not None and self.loop is not None:
            with suppress(RuntimeError):  # the loop closed: the worker is stopping
                self.loop.call_soon_threadsafe(self.deliver, theirs)


def learnt(kind: str, data: dict[str, Any]) -> KeyStateChange | tuple[int, Rested]:
    """An event as another worker wrote it, typed again."""
    if kind == "state":
        return KeyStateChange(**{**data, "state": KeyState(data["state"])})
    group_id = data.pop("group_id")
    return group_id, Rested(**data)


class SharedStates:
    """core.ports.PoolStateSink and RestSink with workers: key states go to the database (the
    writer, as with one process) and, like rests, at once to the other workers."""

    def __init__(self, writer: PoolStateSink, link: WorkerLink) -> None:
        self.writer = writer
        self.link = link

    def save_state(self, change: KeyStateChange) -> None:
        self.writer.save_state(change)
        self.link.publish_state(change)

    def save_rests(self, group_id: int, rests: list[Rested]) -> None:
        self.link.publish_rests(group_id, rests)


def flush(conn: sqlite3.Connection, main: sqlite3.Connection, now: float) -> None:
    """Copy what changed in the shared counters into the database's limit_counters and limit_windows."""
    periods = conn.execute("SELECT name, value FROM periods WHERE dirty = 1").fetchall()
    windows = conn.execute("SELECT id, name, at, amount - flushed FROM windows WHERE amount != flushed").fetchall()
    if periods or windows:
        by_second: dict[tuple[str, int], float] = {}
        for _, name, at, delta in windows:
            by_second[(name, int(at))] = by_second.get((name, int(at)), 0.0) + delta
        per_second = [(name, second, amount) for (name, second), amount in by_second.items()]
        sqlite_counters.save(main, periods, per_second, now)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("UPDATE periods SET dirty = 0 WHERE name = ? AND value = ?", periods)
        conn.executemany("UPDATE windows SET flushed = flushed + ? WHERE id = ?", [(d, i) for i, _, _, d in windows])
        conn.execute("COMMIT")
    # Entries older than any window leave it for good: out of the running totals first (a name not
    # read for an hour still counts them), in one transaction with the delete.
    cutoff = now - MOVING_KEEP_SECONDS
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "UPDATE window_totals SET total = total - (SELECT coalesce(sum(amount), 0) FROM windows w"
            " WHERE w.name = window_totals.name AND w.at > window_totals.pruned_at AND w.at <= ?),"
            " pruned_at = max(pruned_at, ?)"
            " WHERE EXISTS (SELECT 1 FROM windows w WHERE w.name = window_totals.name AND w.at <= ?)",
            (cutoff, cutoff, cutoff),
        )
        conn.execute("DELETE FROM windows WHERE at < ? AND amount = flushed", (cutoff,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("DELETE FROM events WHERE at < ?", (now - EVENTS_KEEP_SECONDS,))
