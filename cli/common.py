"""What several command groups share: a routes command's connection and errors, times and dollars as printed."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from config import Settings
from storage import db, routes


def use_storage(settings: Settings) -> None:
    """The command's database: SQLite at storage.path, or PostgreSQL at storage.url (every connection it opens)."""
    db.use_postgres(settings.storage.url or None)


def on_routes(settings: Settings, act: Callable[[sqlite3.Connection], int]) -> int:
    """Run one upstreams/groups/models command; a missing or taken name is a sentence and exit 1."""
    conn = db.connect(settings.storage_path)
    try:
        return act(conn)
    except (routes.NotFound, routes.Conflict) as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()


def when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def dollars(cost: float | None) -> str:
    return f"${cost or 0:.4f}"
