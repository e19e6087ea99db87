"""KeyPool: the pure decisions as tables, the hooks with mitmproxy's test helpers."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import time

import pytest
from mitmproxy import exceptions
from mitmproxy import flow as mitmproxy_flow
from mitmproxy.io import FlowReader, FlowWriter
from mitmproxy.test import taddons, tflow, tutils

from addons.credential_sender import CredentialSender
from addons.keypool import KeyPool
from addons.runtime import Runtime
from core import upstream
from core.metadata import KeyUse
from storage import db, secrets
from storage.upstream_keys import SqliteKeyStore
from tests.conftest import addon_context, wait_for
from tests.fakes import MemoryBackend, memory_runtime, pool_key
from usecases.keys import add_keys

NOW = 1_800_000_000.0


def body(code: str | None, message: str = "", type_: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


OPENAI_RATE_LIMIT = body("rate_limit_exceeded", "Rate limit reached for gpt-4o-mini", "requests")


KEYS = [
    "sk-good-unit-aaaaaaaaaaaaaaaaaaaaa-0001",
    "sk-good-unit-bbbbbbbbbbbbbbbbbbbbb-0002",
    "sk-good-unit-ccccccccccccccccccccc-0003",
]


@pytest.fixture
def pool_db(database):
    conn = db.connect(database)
    add_keys(SqliteKeyStore(conn, secrets.key_cipher(database)), KEYS)
    conn.close()
    return database


@pytest.fixture
def keypool(pool_db):
    runtime = Runtime()
    pool = KeyPool(sender=CredentialSender(), state=runtime.state, writer=runtime.writer)
    with addon_context(pool, pool_db, runtime) as tctx:
        # Retries go over the network (integration tests do that): here, outside reverse mode, a
        # retry has no upstream to reach and fails at once, like an unreachable one.
        tctx.configure(pool, keypool_max_attempts=1, keypool_wait_max_seconds=0)
        pool._client = upstream.new_client(5)
        yield pool


def run_hook(result) -> None:
    """What mitmproxy does with a hook's return value: await it when it is awaitable."""
    if result is not None:
        asyncio.run(result)


def send(keypool: KeyPool, flow: tflow.HTTPFlow) -> tflow.HTTPFlow:
    """The pool's request hook; without running() (these tests) it puts the key on the flow itself."""
    run_hook(keypool.request(flow))
    return flow


def authorised_flow(header: str = "authorization", value: str = "Bearer kr-client") -> tflow.HTTPFlow:
    flow = tflow.tflow()
    flow.request.headers[header] = value
    return flow


def test_round_robin_swaps_the_credential(keypool):
    seen = []
    for _ in range(4):
        flow = send(keypool, authorised_flow())
        seen.append(flow.request.headers["authorization"])
    assert seen == [f"Bearer {k}" for k in (KEYS[0], KEYS[1], KEYS[2], KEYS[0])]


def test_azure_style_header_keeps_its_form(keypool):
    flow = send(keypool, authorised_flow("api-key", "kr-client"))
    assert flow.request.headers["api-key"] == KEYS[0]
    assert "authorization" not in flow.request.headers


def test_unusable_keys_are_skipped(keypool):
    keypool.state.keys[0].state = "invalid"
    keypool.state.keys[1].state, keypool.state.keys[1].cooldown_until = "cooling", time.time() + 30
    for _ in range(3):
        flow = send(keypool, authorised_flow())
        assert flow.request.headers["authorization"] == f"Bearer {KEYS[2]}"


def test_no_usable_key_answers_503_with_soonest_retry_after(keypool):
    for key, wait in zip(keypool.state.keys, (None, 42, 17), strict=True):
        key.state, key.cooldown_until = ("invalid", None) if wait is None else ("cooling", time.time() + wait)
    flow = authorised_flow()
    run_hook(keypool.request(flow))
    assert flow.response.status_code == 503
    assert flow.response.headers["retry-after"] in ("17", "18")
    assert json.loads(flow.response.content)["error"]["code"] == "no_upstream_key_available"


def test_keyrotors_own_503_is_final_and_never_sent_on_to_another_group(keypool):
    for key in keypool.state.keys:
        key.state = "invalid"
    flow = authorised_flow()
    run_hook(keypool.request(flow))
    refusal = flow.response
    assert refusal.status_code == 503 and KeyUse.of(flow.metadata).settled
    assert keypool.response(flow) is None  # mitmproxy's response hook: no retry of our own answer
    assert flow.response is refusal and json.loads(refusal.content)["error"]["code"] == "no_upstream_key_available"


def test_answered_flows_are_left_alone(keypool):
    flow = authorised_flow()
    flow.response = tutils.tresp(status_code=401)
    run_hook(keypool.request(flow))
    assert flow.request.headers["authorization"] == "Bearer kr-client"


def test_a_401_marks_the_key_invalid_in_memory_and_on_disk(keypool, pool_db):
    flow = authorised_flow()
    run_hook(keypool.request(flow))
    flow.response = tutils.tresp(status_code=401, content=body("invalid_api_key"))
    run_hook(keypool.response(flow))
    assert keypool.state.keys[0].state == "invalid"

    def stored_state():
        conn = sqlite3.connect(pool_db)
        state = conn.execute("SELECT state, state_reason FROM upstream_keys WHERE id = 1").fetchone()
        conn.close()
        return state == ("invalid", "401 invalid_api_key")

    wait_for(stored_state, what="the invalid state to be stored")


def test_a_success_after_cooldown_brings_the_key_back(keypool):
    key = keypool.state.keys[0]
    key.state, key.cooldown_until = "cooling", time.time() - 1
    flow = authorised_flow()
    run_hook(keypool.request(flow))
    flow.response = tutils.tresp(status_code=200)
    run_hook(keypool.response(flow))
    assert key.state == "active" and key.cooldown_until is None


def test_a_success_sent_before_a_429_does_not_undo_the_cooldown(keypool):
    early = send(keypool, authorised_flow())
    for _ in range(len(KEYS)):
        late = send(keypool, authorised_flow())  # round robin comes back to key 1
    late.response = tutils.tresp(status_code=429, headers=((b"retry-after", b"30"),), content=OPENAI_RATE_LIMIT)
    run_hook(keypool.response(late))
    early.response = tutils.tresp(status_code=200)
    run_hook(keypool.response(early))
    assert keypool.state.keys[0].state == "cooling"


def test_with_its_sender_the_key_never_reaches_the_flow(keypool):
    keypool.sender.installed = True  # its patch is in (addons/patches.py): running() hands the keys to it
    keypool.running()
    flow = authorised_flow()
    run_hook(keypool.request(flow))
    # What every hook, mitmweb's view among them, sees: the key is handed to the sender only.
    assert flow.request.headers["authorization"] == "Bearer [upstream key #1 ...0001]"
    assert keypool.sender.outgoing[flow.id] == KEYS[0]
    assert KEYS[0] not in str(flow.get_state())
    flow.response = tutils.tresp()
    keypool.responseheaders(flow)
    assert flow.id not in keypool.sender.outgoing
    assert KEYS[0] not in str(flow.get_state())


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("keypool_strategy", "fastest", 'keypool.strategy must be one of "round_robin", .* keypool_strategy'),
        ("keypool_cooldown_seconds", 0, "keypool.cooldown_seconds must be a whole number above zero"),
    ],
)
def test_bad_options_are_refused(option, value, message):
    pool = KeyPool()
    with taddons.context(pool) as tctx:
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(pool, **{option: value})


def test_under_mitmdump_the_key_is_hidden_once_the_request_has_left(keypool):
    flow = send(keypool, authorised_flow())
    assert flow.request.headers["authorization"] == f"Bearer {KEYS[0]}"
    flow.response = tutils.tresp()
    keypool.responseheaders(flow)
    assert flow.request.headers["authorization"] == "Bearer [upstream key #1 ...0001]"


def test_a_flow_the_pool_handled_can_be_saved_to_a_flow_file_and_read_back(keypool):
    # mitmdump -w and mitmweb's Save write flows with their metadata; flow files hold plain values only.
    flow = send(keypool, authorised_flow())
    flow.response = tutils.tresp()
    keypool.responseheaders(flow)
    run_hook(keypool.response(flow))
    buffer = io.BytesIO()
    FlowWriter(buffer).add(flow)
    assert KEYS[0].encode() not in buffer.getvalue()
    (loaded,) = FlowReader(io.BytesIO(buffer.getvalue())).stream()
    use = KeyUse.of(loaded.metadata)
    assert use.key_id == 1 and use.settled and [a.status for a in use.attempts] == [200]


@pytest.mark.parametrize("cooled", [False, True])
def test_a_client_that_hangs_up_releases_the_key_it_held(keypool, cooled):
    key = keypool.state.keys[0]
    if cooled:  # its cooldown is over: the request is the probe, and others wait for its answer
        key.state, key.cooldown_until = "cooling", time.time() - 1
    flow = send(keypool, authorised_flow())
    pool = keypool.state.rotations[keypool.state.table.default_group.id].pool  # the only group's
    runtime = pool.runtime[key.id]
    assert runtime.in_flight == 1 and runtime.probing == cooled
    flow.error = mitmproxy_flow.Error("Client disconnected.")
    run_hook(keypool.error(flow))
    assert runtime.in_flight == 0 and not runtime.probing
    assert not runtime.proven and key.state == ("cooling" if cooled else "active")  # nothing learnt
    # Unproven keys (and a probe) take one request at a time: the released key may take the next.
    assert pool.is_usable(key, time.time())


def test_over_in_memory_ports_the_pool_rotates_and_its_lessons_reach_the_writer():
    backend = MemoryBackend()
    backend.keys.keys = [pool_key(i + 1, value) for i, value in enumerate(KEYS)]
    runtime = memory_runtime(backend)
    pool = KeyPool(sender=CredentialSender(), state=runtime.state, writer=runtime.writer)
    with taddons.context(pool) as tctx:
        tctx.configure(pool, keypool_max_attempts=1, keypool_wait_max_seconds=0)
        seen = [send(pool, authorised_flow()).request.headers["authorization"] for _ in range(2)]
        assert seen == [f"Bearer {KEYS[0]}", f"Bearer {KEYS[1]}"]
        flow = send(pool, authorised_flow())
        flow.response = tutils.tresp(status_code=401, content=body("invalid_api_key"))
        run_hook(pool.response(flow))
    assert pool.state.keys[2].state == "invalid"
    assert [(c.key_id, c.state) for c in backend.writer.states] == [(3, "invalid")]
    assert pool.state is runtime.state
