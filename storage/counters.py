"""core.ports.Counters for one machine: in memory for the proxy's hooks, persisted to SQLite off the loop.

The hooks read and add in memory (microseconds, nothing blocks); a thread of its own writes
what changed to the `limit_counters` table every FLUSH_SECONDS and at shutdown, so a restarted
proxy starts from the counts and spend it had. A kill -9 loses at most the last flush interval.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path

from core.limits import spend_names
from storage import db

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.2
MOVING_KEEP_SECONDS = 3600.0  # entries older than any moving window keyrotor uses are dropped
PERIOD_KEEP_SECONDS = 40 * 86400  # a month's total is still shown for a while after it ends


class _Window:
    """A moving window: entries [at, amount] oldest first, and their running sum."""

    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        self.entries: deque[list[float]] = deque()
        self.total = 0.0

    def prune(self, since: float) -> None:
        entries = self.entries
        while entries and entries[0][0] <= since:
            self.total -= entries.popleft()[1]


class MemoryCounters:
    """Counters held in this process; thread-safe, so a persister can copy them while hooks add."""

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}
        self._periods: dict[str, float] = {}
        self._gauges: dict[str, int] = {}
        self._lock = threading.Lock()
        self._dirty: set[str] = set()

    def moving_total(self, name: str, window_seconds: float, now: float) -> tuple[float, float | None]:
        window = self._windows.get(name)
        if window is None:
            return 0.0, None
        with self._lock:
            before = len(window.entries)
            window.prune(now - window_seconds)
            if len(window.entries) != before:
                self._dirty.add(name)
            return window.total, (window.entries[0][0] if window.entries else None)

    def moving_add(self, name: str, amount: float, now: float) -> object:
        entry = [now, amount]
        with self._lock:
            window = self._windows.get(name)
            if window is None:
                window = self._windows[name] = _Window()
            window.entries.append(entry)
            window.total += amount
            self._dirty.add(name)
        return entry

    def moving_adjust(self, name: str, entry: object, amount: float) -> None:
        with self._lock:
            window = self._windows.get(name)
            if window is None or not isinstance(entry, list):
                return
            if window.entries and entry[0] >= window.entries[0][0]:  # still in the window
                window.total += amount - entry[1]
            entry[1] = amount
            self._dirty.add(name)

    def period_total(self, name: str) -> float:
        return self._periods.get(name, 0.0)

    def period_add(self, name: str, amount: float) -> None:
        with self._lock:
            self._periods[name] = self._periods.get(name, 0.0) + amount
            self._dirty.add(name)

    def gauge(self, name: str) -> int:
        return self._gauges.get(name, 0)

    def gauge_add(self, name: str, delta: int) -> None:
        with self._lock:
            self._gauges[name] = max(0, self._gauges.get(name, 0) + delta)

    # ------------------------------------------------------------------ persistence

    def take_dirty(self) -> list[tuple[str, str, float, str | None]]:
        """What changed since the last call, as rows (name, kind, value, entries JSON)."""
        with self._lock:
            names, self._dirty = self._dirty, set()
            rows = []
            for name in names:
                if name in self._windows:
                    window = self._windows[name]
                    rows.append((name, "moving", window.total, json.dumps(list(window.entries))))
                elif name in self._periods:
                    rows.append((name, "period", self._periods[name], None))
            return rows

    def restore(self, rows: list[sqlite3.Row], now: float) -> None:
        with self._lock:
            for row in rows:
                if row["kind"] == "moving":
                    window = _Window()
                    for at, amount in json.loads(row["entries"] or "[]"):
                        if at > now - MOVING_KEEP_SECONDS:
                            window.entries.append([at, amount])
                            window.total += amount
                    self._windows[row["name"]] = window
                else:
                    self._periods[row["name"]] = row["value"]


class SqliteCounters(MemoryCounters):
    """MemoryCounters loaded from and written to the database by a thread of their own."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        conn = db.connect(self.path)
        try:
            now = time.time()
            self.restore(conn.execute("SELECT name, kind, value, entries FROM limit_counters").fetchall(), now)
        finally:
            conn.close()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="keyrotor-counters", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what changed, then end the thread."""
        self._stop.set()
        if self._thread:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        conn = db.connect(self.path)
        next_purge = 0.0
        try:
            while True:
                stopping = self._stop.wait(FLUSH_SECONDS)
                try:
                    self.flush(conn)
                    if time.monotonic() >= next_purge:
                        next_purge = time.monotonic() + 600
                        purge(conn, time.time())
                except sqlite3.Error:
                    log.exception("saving client limit counters failed; retrying")
                if stopping:
                    return
        finally:
            conn.close()

    def flush(self, conn: sqlite3.Connection) -> None:
        rows = self.take_dirty()
        if not rows:
            return
        now = time.time()
        try:
            with conn:
                conn.executemany(
                    "INSERT INTO limit_counters (name, kind, value, entries, updated_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value, entries = excluded.entries,"
                    " updated_at = excluded.updated_at",
                    [(*row, now) for row in rows],
                )
        except sqlite3.Error:
            with self._lock:
                self._dirty.update(row[0] for row in rows)  # written next time
            raise


def purge(conn: sqlite3.Connection, now: float) -> None:
    with conn:
        conn.execute(
            "DELETE FROM limit_counters"
            " WHERE (kind = 'moving' AND updated_at < ?) OR (kind = 'period' AND updated_at < ?)",
            (now - MOVING_KEEP_SECONDS, now - PERIOD_KEEP_SECONDS),
        )


def spend_of(conn: sqlite3.Connection, names: list[str]) -> dict[str, float]:
    """Saved calendar totals by counter name (core.limits.spend_name), for the CLI and the UI."""
    if not names:
        return {}
    marks = ",".join("?" * len(names))
    return dict(conn.execute(f"SELECT name, value FROM limit_counters WHERE name IN ({marks})", names).fetchall())


def clients_spend(conn: sqlite3.Connection, client_ids: list[int], now: float) -> dict[int, dict[str, float]]:
    """Each client's spend this UTC day and month as the proxy last saved it (within FLUSH_SECONDS)."""
    names = {client_id: spend_names(client_id, now) for client_id in client_ids}
    saved = spend_of(conn, [n for by_kind in names.values() for n in by_kind.values()])
    return {
        client_id: {kind: saved.get(name, 0.0) for kind, name in by_kind.items()}
        for client_id, by_kind in names.items()
    }
