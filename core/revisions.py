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
    names: str | tuple[str, ...],
    on_change: Callable[[], Any],
    seen: int | tuple[int, ...],
    apply: Callable[[Any], None] | None = None,
) -> None:
    """Call `on_change` (in a worker thread) whenever one of the revisions `names` moves past
    `seen`, then `apply` its result on the loop, where the hooks that read it run.

    Several names are read in one query: the poll runs on the event loop every half second.
    """
    names = (names,) if isinstance(names, str) else names
    seen = (seen,) if isinstance(seen, int) else seen
    while True:
        await asyncio.sleep(POLL_SECONDS)
        current = revisions.read_all(names)
        if current is None or current == seen:
            continue  # unreadable right now (busy): the next poll will see it
        try:
            result = await asyncio.to_thread(on_change)
            if apply is not None:
                apply(result)
            seen = current
        except Exception:
            log.exception("reloading %s after an admin change failed; retrying", ", ".join(names))
