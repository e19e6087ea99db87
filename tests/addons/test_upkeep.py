"""Upkeep: re-validating refused keys and keeping fetched model lists fresh, in the background."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from mitmproxy.test import taddons

from addons.keypool import KeyPool
from addons.upkeep import Upkeep
from core.models import FetchedModels, KeyState
from tests.fakes import MemoryBackend, default_group, memory_runtime, pool_key

TARGET = "http://upstream.test"


def listing(request: httpx.Request) -> httpx.Response:
    if request.headers["authorization"] == "Bearer sk-memory-revoked-0002":
        return httpx.Response(401, json={"error": {"code": "invalid_api_key"}})
    return httpx.Response(200, json={"object": "list", "data": [{"id": "gpt-4o"}, {"id": "o3"}]})


@pytest.fixture
def upkeep():
    backend = MemoryBackend()
    backend.routes.groups = [default_group(models={"gpt-4o": None}, models_fetched=True)]
    backend.keys.keys = [
        pool_key(1, "sk-memory-exhausted-0001", state=KeyState.EXHAUSTED),
        pool_key(2, "sk-memory-revoked-0002", state=KeyState.INVALID),
        pool_key(3, "sk-memory-active-0003"),
    ]
    runtime = memory_runtime(backend)
    addon = Upkeep(runtime.state, runtime.writer)
    with taddons.context(addon) as tctx:
        tctx.options.update(mode=[f"reverse:{TARGET}/"])
        addon._client = httpx.AsyncClient(transport=httpx.MockTransport(listing))
        yield addon, runtime


def test_a_fetched_list_is_fetched_again_and_stored(upkeep):
    addon, runtime = upkeep
    group, rotation = runtime.state.table.groups[0], runtime.state.rotations[1]
    asyncio.run(addon._refresh_models(group, rotation))
    assert runtime.writer.models == [FetchedModels(1, ("gpt-4o", "o3"))]


def test_a_list_typed_by_hand_is_left_alone(upkeep):
    addon, runtime = upkeep
    group = default_group(models={"mine": None})  # models_fetched=False
    asyncio.run(addon._refresh_models(group, runtime.state.rotations[1]))
    assert runtime.writer.models == []


def test_refused_keys_that_pass_come_back(upkeep):
    addon, runtime = upkeep
    rotation = runtime.state.rotations[1]
    asyncio.run(rotation.revalidate(addon._client, runtime.state.table.groups[0].upstream, TARGET))
    states = {k.id: k.state for k in rotation.pool.keys}
    assert states == {1: KeyState.ACTIVE, 2: KeyState.INVALID, 3: KeyState.ACTIVE}
    assert [c.key_id for c in runtime.writer.states] == [1]  # the change goes to the one writer


def test_the_loop_runs_every_interval_and_stops_with_the_proxy():
    backend = MemoryBackend()
    backend.routes.groups = [default_group(models={"gpt-4o": None}, models_fetched=True)]
    backend.keys.keys = [pool_key(1, "sk-memory-exhausted-0001", state=KeyState.EXHAUSTED)]
    runtime = memory_runtime(backend)
    addon, pool = Upkeep(runtime.state, runtime.writer), KeyPool(state=runtime.state)

    async def scenario():
        with taddons.context(pool, addon) as tctx:  # the key pool declares the keypool_* options
            tctx.configure(pool, keypool_revalidate_seconds=1, mode=[f"reverse:{TARGET}"])
            addon.running()
            addon._client = httpx.AsyncClient(transport=httpx.MockTransport(listing))
            deadline = time.monotonic() + 10
            while not runtime.writer.models:
                assert time.monotonic() < deadline, "no round of upkeep ran"
                await asyncio.sleep(0.02)
            addon.done()
            assert addon._task is None

    asyncio.run(scenario())
    assert runtime.state.keys[0].state == KeyState.ACTIVE  # re-validated, then its group's list fetched
    assert runtime.writer.models == [FetchedModels(1, ("gpt-4o", "o3"))]


def test_no_interval_no_loop():
    runtime = memory_runtime()
    addon, pool = Upkeep(runtime.state, runtime.writer), KeyPool(state=runtime.state)
    with taddons.context(pool, addon) as tctx:
        tctx.configure(pool, keypool_revalidate_seconds=0)
        addon.running()
        assert addon._task is None and addon._client is None
