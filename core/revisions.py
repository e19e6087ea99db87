"""Watching a revision counter, so a running proxy sees admin changes within a second."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from core.ports import Revisions

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
NUDGED_POLL_SECONDS = 0.01  # after a nudge, until the change is read (it may not be committed yet)


async def watch_revision(
    revisions: Revisions,
    names: str | tuple[str, ...],
    on_change: Callable[[], Any],
    seen: int | tuple[int, ...],
    apply: Callable[[Any], None] | None = None,
    nudge: asyncio.Event | None = None,
) -> None:
    """Call `on_change` (in a worker thread) whenever one of the revisions `names` moves past
    `seen`, then `apply` its result on the loop, where the hooks that read it run.

    Several names are read in one query: the poll runs on the event loop every half second.
    `nudge`: set when another process announces a change (Redis, storage/redis_shared.py): the
    revisions are read at once, then every NUDGED_POLL_SECONDS for up to POLL_SECONDS, since the
    announcement may come before its transaction is committed.
    """
    names = (names,) if isinstance(names, str) else names
    seen = (seen,) if isinstance(seen, int) else seen
    hurry_until = 0.0
    loop = asyncio.get_running_loop()
    while True:
        if loop.time() < hurry_until:
            await asyncio.sleep(NUDGED_POLL_SECONDS)
        elif nudge is None:
            await asyncio.sleep(POLL_SECONDS)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(nudge.wait(), POLL_SECONDS)
        if nudge is not None and nudge.is_set():
            nudge.clear()
            hurry_until = loop.time() + POLL_SECONDS
        current = revisions.read_all(names)
        if current is None or current == seen:
            continue  # unreadable right now (busy): the next poll will see it
        hurry_until = 0.0
        try:
            result = await asyncio.to_thread(on_change)
            if apply is not None:
                apply(result)
            seen = current
        except Exception:
            log.exception("reloading %s after an admin change failed; retrying", ", ".join(names))
