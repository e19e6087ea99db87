"""Polls a revision counter so the proxy sees admin changes made by the CLI or UI within a second."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage import db

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


async def watch_revision(
    db_path: Path, name: str, on_change: Callable[[], Any], seen: int, apply: Callable[[Any], None] | None = None
) -> None:
    """Call `on_change` (in a worker thread) whenever revision `name` moves past `seen`,
    then `apply` its result on the loop, where the hooks that read it run."""
    conn = db.connect(db_path)
    # Read on the loop itself: a one-row read takes microseconds and, with WAL and no busy
    # wait, can never block; a thread hand-off every poll would cost more than the read.
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                current = db.read_revision(conn, name)
            except sqlite3.OperationalError:
                continue  # busy right now: the next poll will see it
            if current == seen:
                continue
            try:
                result = await asyncio.to_thread(on_change)
                if apply is not None:
                    apply(result)
                seen = current
            except Exception:
                log.exception("reloading %s after an admin change failed; retrying", name)
    finally:
        conn.close()
