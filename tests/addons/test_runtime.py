"""The runtime: one state snapshot, one revision watcher, one writer per proxy process, over any backend."""

from __future__ import annotations

import asyncio
import time

import pytest

from addons import keyrotor
from addons.runtime import Runtime
from core import revisions
from core.credentials import hash_client_key
from core.models import Client
from core.state import CLIENTS, KEYS, OBJECTS, ROUTES, WATCHED, ProxyState
from storage import objects, routes
from tests.fakes import MemoryBackend, default_group, memory_runtime, pool_key


def test_the_addons_share_one_state_one_writer_and_one_governor():
    runtime = next(a for a in keyrotor.addons if isinstance(a, Runtime))
    states = {id(a.state) for a in keyrotor.addons if isinstance(getattr(a, "state", None), ProxyState)}
    assert states == {id(runtime.state)}  # one route table and one poller in the process
    assert runtime.state.table is not None
    governors = {id(a.governor) for a in keyrotor.addons if hasattr(a, "governor")}
    assert governors == {id(runtime.governor)}
    writers = {id(w) for a in keyrotor.addons for w in (getattr(a, "_writer", None), getattr(a, "_records", None)) if w}
    assert writers == {id(runtime.writer)}


def test_the_runtime_is_the_last_addon():
    # Its done() stops the writer: every other addon's done() has queued its last rows by then.
    assert isinstance(keyrotor.addons[-1], Runtime)
    assert sum(isinstance(a, Runtime) for a in keyrotor.addons) == 1


def test_models_come_before_the_key_pool_and_their_merge_right_after():
    names = [type(a).__name__ for a in keyrotor.addons]
    assert names.index("Models") + 1 == names.index("KeyPool") == names.index("ModelsMerge") - 1


def test_the_watched_revisions_are_the_ones_storage_bumps():
    assert (KEYS, ROUTES, CLIENTS, OBJECTS) == ("keys", routes.ROUTES, "clients", objects.OBJECTS)


def backend_with_keys() -> MemoryBackend:
    backend = MemoryBackend()
    backend.keys.keys = [pool_key(1, "sk-memory-aaaaaaaaaaaaaaaaaaaa-0001"), pool_key(2, "sk-memory-bbbb-0002")]
    backend.clients.clients = {hash_client_key("kr-alice"): (Client(1, "alice"), 7)}
    backend.owners.rows = [("file-1", 2)]
    return backend


def test_opening_reads_the_whole_state_over_the_ports():
    backend = backend_with_keys()
    runtime = memory_runtime(backend)
    state = runtime.state
    assert [g.label for g in state.table.groups] == ["default/default"]
    assert [k.id for k in state.rotations[1].pool.keys] == [1, 2]
    assert state.clients[hash_client_key("kr-alice")] == (Client(1, "alice"), 7)
    assert state.clients_by_id == {1: Client(1, "alice")}
    assert state.owners == {"file-1": 2}
    assert runtime.governor.counters is backend.counters
    assert state.rotations[1].states is runtime.writer  # learnt key states go to the one writer


def run_watching(runtime: Runtime, change, until, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the runtime on a loop, make an admin change, and wait until the state shows it."""
    monkeypatch.setattr(revisions, "POLL_SECONDS", 0.01)

    async def scenario():
        runtime.start()
        try:
            change()
            deadline = time.monotonic() + 5
            while not until():
                assert time.monotonic() < deadline, "the change never reached the state"
                await asyncio.sleep(0.01)
        finally:
            runtime.stop()

    asyncio.run(scenario())


def test_a_key_change_reloads_routes_and_keys_and_keeps_what_the_pool_learnt(monkeypatch):
    backend = backend_with_keys()
    runtime = memory_runtime(backend)
    rotation = runtime.state.rotations[1]
    rotation.pool.runtime[1].in_flight = 1  # a request holds key 1

    def add_key():
        backend.keys.keys.append(pool_key(3, "sk-memory-cccc-0003"))
        backend.change(KEYS)

    run_watching(runtime, add_key, lambda: len(runtime.state.keys) == 3, monkeypatch)
    assert runtime.state.rotations[1] is rotation and rotation.pool.runtime[1].in_flight == 1
    assert backend.writer.started and backend.writer.stopped


def test_a_route_change_swaps_in_one_new_table(monkeypatch):
    backend = backend_with_keys()
    runtime = memory_runtime(backend)
    before = runtime.state.table

    def list_a_model():
        backend.routes.groups = [default_group(models={"gpt-4o": None})]
        backend.change(ROUTES)

    run_watching(runtime, list_a_model, lambda: runtime.state.table is not before, monkeypatch)
    assert runtime.state.table.listed_models() == ["gpt-4o"]


def test_a_client_change_reads_only_the_clients(monkeypatch):
    backend = backend_with_keys()
    runtime = memory_runtime(backend)
    table = runtime.state.table

    def revoke():
        backend.clients.clients = {}
        backend.change(CLIENTS)

    run_watching(runtime, revoke, lambda: not runtime.state.clients, monkeypatch)
    assert runtime.state.clients_by_id == {}
    assert runtime.state.table is table  # routes and keys were not read again


def test_new_object_owners_are_read_a_few_at_a_time(monkeypatch):
    backend = backend_with_keys()
    runtime = memory_runtime(backend)
    runtime.state.owners["batch-learnt-here"] = 1  # this process learnt it first

    def store_owners():
        backend.owners.rows += [("file-2", 1), ("batch-learnt-here", 2)]
        backend.change(OBJECTS)

    run_watching(runtime, store_owners, lambda: "file-2" in runtime.state.owners, monkeypatch)
    assert runtime.state.owners == {"file-1": 2, "file-2": 1, "batch-learnt-here": 1}


def test_one_poller_reads_every_watched_revision_at_once(monkeypatch):
    backend = backend_with_keys()
    runtime = memory_runtime(backend)
    polls = backend.store_revisions.reads
    run_watching(runtime, lambda: None, lambda: backend.store_revisions.reads >= polls + 3, monkeypatch)
    assert backend.reads == 1  # nothing changed: nothing was read again
    assert runtime.state.revisions() == tuple(0 for _ in WATCHED)


def test_before_storage_is_set_the_state_is_empty():
    runtime = memory_runtime(open_it=False)
    assert runtime.state.table.groups == [] and runtime.state.rotations == {} and runtime.state.clients == {}
