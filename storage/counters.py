"""core.ports.Counters for one machine: in memory for the proxy's hooks, persisted to SQLite off the loop.

The hooks read and add in memory (microseconds, nothing blocks); a thread of its own writes
what changed every FLUSH_SECONDS and at shutdown, so a restarted proxy starts from the counts
and spend it had. A kill -9 loses at most the last flush interval.

What is written is proportional to what changed, not to what the windows hold: calendar
totals by name (`limit_counters`), and each moving window's amount per second
(`limit_windows`). A restored window's entries are those seconds, each leaving the window at
the end of its second: never earlier than the requests it stands for.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from core.limits import spend_names
from storage import db

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0  # spend shown by the CLI and UI is at most this old; a kill -9 loses at most this
_ONE_PROCESS: AbstractContextManager[None] = nullcontext()
MOVING_KEEP_SECONDS = 3600  # entries older than any moving window keyrotor uses are not restored
PERIOD_KEEP_SECONDS = 40 * 86400  # a month's total is still shown for a while after it ends
PURGE_SECONDS = 600
COMPLAIN_SECONDS = 30.0  # while saving fails, a log line at most this often


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
    """Counters held in this process; thread-safe, so a persister can take changes while hooks add."""

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}
        self._periods: dict[str, float] = {}
        self._gauges: dict[str, int] = {}
        self._lock = threading.Lock()
        self._dirty_periods: set[str] = set()
        self._window_changes: dict[tuple[str, int], float] = {}  # (name, second) → amount added

    def moving_total(self, name: str, window_seconds: float, now: float) -> tuple[float, float | None]:
        window = self._windows.get(name)
        if window is None:
            return 0.0, None
        with self._lock:
            window.prune(now - window_seconds)
            return window.total, (window.entries[0][0] if window.entries else None)

    def moving_add(self, name: str, amount: float, now: float) -> object:
        entry = [now, amount]
        with self._lock:
            window = self._windows.get(name)
            if window is None:
                window = self._windows[name] = _Window()
            window.entries.append(entry)
            window.total += amount
            key = (name, int(now))
            self._window_changes[key] = self._window_changes.get(key, 0.0) + amount
        return entry

    def moving_adjust(self, name: str, entry: object, amount: float) -> None:
        with self._lock:
            window = self._windows.get(name)
            if window is None or not isinstance(entry, list):
                return
            delta = amount - entry[1]
            if window.entries and entry[0] >= window.entries[0][0]:  # still in the window
                window.total += delta
            entry[1] = amount
            key = (name, int(entry[0]))
            self._window_changes[key] = self._window_changes.get(key, 0.0) + delta

    def period_total(self, name: str) -> float:
        return self._periods.get(name, 0.0)

    def set_period(self, name: str, value: float) -> None:
        """A total as the shared counters hold it (storage/redis_shared.py): not a change of this process's."""
        self._periods[name] = value

    def period_add(self, name: str, amount: float) -> None:
        with self._lock:
            self._periods[name] = self._periods.get(name, 0.0) + amount
            self._dirty_periods.add(name)

    def gauge(self, name: str) -> int:
        return self._gauges.get(name, 0)

    def atomic(self) -> AbstractContextManager[None]:
        return _ONE_PROCESS  # the Governor's calls on the loop cannot interleave

    def gauge_add(self, name: str, delta: int) -> None:
        with self._lock:
            self._gauges[name] = max(0, self._gauges.get(name, 0) + delta)

    # ------------------------------------------------------------------ persistence

    def take_changes(self) -> tuple[list[tuple[str, float]], list[tuple[str, int, float]]]:
        """What changed since the last call: (period totals, window amounts added per second)."""
        with self._lock:
            periods = [(name, self._periods[name]) for name in self._dirty_periods]
            windows = [(name, second, amount) for (name, second), amount in self._window_changes.items()]
            self._dirty_periods = set()
            self._window_changes = {}
        return periods, windows

    def give_back(self, periods: list[tuple[str, float]], windows: list[tuple[str, int, float]]) -> None:
        """Changes a failed write did not save: written with the next ones."""
        with self._lock:
            self._dirty_periods.update(name for name, _ in periods)
            for name, second, amount in windows:
                self._window_changes[(name, second)] = self._window_changes.get((name, second), 0.0) + amount

    def restore(self, conn: sqlite3.Connection, now: float) -> None:
        with self._lock:
            for name, value in conn.execute("SELECT name, value FROM limit_counters"):
                self._periods[name] = value
            for name, second, amount in conn.execute(
                "SELECT name, second, amount FROM limit_windows WHERE second > ? ORDER BY name, second",
                (int(now) - MOVING_KEEP_SECONDS,),
            ):
                window = self._windows.get(name)
                if window is None:
                    window = self._windows[name] = _Window()
                window.entries.append([second + 1.0, amount])  # leaves the window at its second's end
                window.total += amount


class SqliteCounters(MemoryCounters):
    """MemoryCounters loaded from and written to the database by a thread of their own."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        conn = db.connect(self.path)
        try:
            self.restore(conn, time.time())
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
        complained_at = -COMPLAIN_SECONDS
        try:
            while True:
                stopping = self._stop.wait(FLUSH_SECONDS)
                try:
                    self.flush(conn)
                    if time.monotonic() >= next_purge:
                        next_purge = time.monotonic() + PURGE_SECONDS
                        purge(conn, time.time())
                except sqlite3.OperationalError as e:  # unreachable or locked: no traceback every second
                    if time.monotonic() >= complained_at + COMPLAIN_SECONDS:
                        complained_at = time.monotonic()
                        log.warning("saving client limit counters failed (%s); retrying", e)
                except sqlite3.Error:
                    log.exception("saving client limit counters failed; retrying")
                if stopping:
                    return
        finally:
            conn.close()

    def flush(self, conn: sqlite3.Connection) -> None:
        periods, windows = self.take_changes()
        if not periods and not windows:
            return
        try:
            save(conn, periods, windows, time.time())
        except sqlite3.Error:
            self.give_back(periods, windows)
            raise


def save(
    conn: sqlite3.Connection, periods: list[tuple[str, float]], windows: list[tuple[str, int, float]], now: float
) -> None:
    """Calendar totals (replaced) and amounts added to moving windows per second, in one transaction."""
    with conn:
        conn.executemany(
            "INSERT INTO limit_counters (name, value, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            [(name, value, now) for name, value in periods],
        )
        conn.executemany(
            "INSERT INTO limit_windows (name, second, amount) VALUES (?, ?, ?)"
            " ON CONFLICT (name, second) DO UPDATE SET amount = amount + excluded.amount",
            windows,
        )


def purge(conn: sqlite3.Connection, now: float) -> None:
    with conn:
        conn.execute("DELETE FROM limit_windows WHERE second < ?", (int(now) - MOVING_KEEP_SECONDS,))
        conn.execute("DELETE FROM limit_counters WHERE updated_at < ?", (now - PERIOD_KEEP_SECONDS,))


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
