"""Watching a revision counter, so a running proxy sees admin changes within a second."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from core.ports import Revisions

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


async def watch_revision(
    revisions: Revisions,
    name: str,
    on_change: Callable[[], Any],
    seen: int,
    apply: Callable[[Any], None] | None = None,
) -> None:
    """Call `on_change` (in a worker thread) whenever revision `name` moves past `seen`,
    then `apply` its result on the loop, where the hooks that read it run."""
    while True:
        await asyncio.sleep(POLL_SECONDS)
        current = revisions.read(name)
        if current is None or current == seen:
            continue  # unreadable right now (busy): the next poll will see it
        try:
            result = await asyncio.to_thread(on_change)
            if apply is not None:
                apply(result)
            seen = current
        except Exception:
            log.exception("reloading %s after an admin change failed; retrying", name)
