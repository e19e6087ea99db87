"""Background upkeep of the key pools: re-validation and fresh model lists.

Every `keypool_revalidate_seconds` (0: never), the invalid and exhausted keys of each group
are probed with GET /v1/models, and a key that passes comes back; a group whose model list
was fetched from upstream (not typed by hand) gets it fetched again and stored.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
from mitmproxy import ctx

from core import upstream
from core.models import FetchedModels
from core.ports import ModelListSink
from core.rotation import Rotation
from core.routing import Group, reverse_target_of
from core.state import ProxyState

log = logging.getLogger(__name__)


class Upkeep:
    def __init__(self, state: ProxyState, writer: ModelListSink | None = None) -> None:
        self.state = state  # the runtime's (addons/runtime.py): groups and their pools
        self._writer = writer  # where refreshed model lists go
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None

    def running(self) -> None:
        if ctx.options.keypool_revalidate_seconds <= 0:
            return
        if getattr(ctx.options, "proxy_workers", 1) > 1 and ctx.options.proxy_worker_index != 0:
            return  # with workers, worker 0 probes for all: what it learns reaches the others (docs/workers.md)
        self._client = upstream.new_client(ctx.options.keypool_attempt_timeout_seconds)
        self._task = asyncio.create_task(self._revalidate_periodically())

    def done(self) -> None:
        if self._task:
            self._task.cancel()
            self._task = None
        self._client = None  # its pooled connections close with the process

    async def _revalidate_periodically(self) -> None:
        interval = ctx.options.keypool_revalidate_seconds
        while True:
            await asyncio.sleep(interval)
            client = self._client
            if client is None:
                return
            try:
                for group in list(self.state.table.groups):
                    rotation = self.state.rotations.get(group.id)
                    if rotation is not None:
                        await rotation.revalidate(client, group.upstream, reverse_target_of(ctx.options.mode))
                        await self._refresh_models(group, rotation)
            except Exception:
                log.exception("re-validating keys failed; trying again in %d s", interval)

    async def _refresh_models(self, group: Group, rotation: Rotation) -> None:
        """A group whose list came from upstream keeps it fresh (lists typed by hand are left alone)."""
        if not group.models_fetched or self._writer is None or self._client is None:
            return
        key = next((k for k in rotation.pool.keys if k.state == "active"), None)
        if key is None:
            return
        target = reverse_target_of(ctx.options.mode)
        try:
            models = await upstream.list_models(self._client, group.upstream, target, key.value)
        except upstream.ModelListError as e:
            log.warning("refreshing the models of %s failed: %s", group.label, e)
            return
        self._writer.save_models(FetchedModels(group.id, tuple(models)))
