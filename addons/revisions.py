"""Polls a revision counter so the proxy sees admin changes made by the CLI or UI within a second."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from storage import db

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


async def watch_revision(db_path: Path, name: str, on_change: Callable[[], None], seen: int) -> None:
    """Call `on_change` (in a worker thread) whenever revision `name` moves past `seen`."""
    conn = db.connect(db_path)
    try:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                current = await asyncio.to_thread(db.read_revision, conn, name)
                if current != seen:
                    await asyncio.to_thread(on_change)
                    seen = current
            except Exception:
                log.exception("reloading %s after an admin change failed; retrying", name)
    finally:
        conn.close()
