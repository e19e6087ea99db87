"""What nodes share through Redis (storage/redis_shared.py), against a real redis-server (tests/services.py).

Two nodes are two sets of objects on one Redis here, each with its own connections, as two
processes would be; tests/test_redis_integration.py runs real proxies.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from core.limits import ClientPolicy, Governor, Refusal, Ticket, estimate_tokens
from core.models import KeyState, KeyStateChange
from core.pool import Rested
from storage import db, redis_shared
from storage.counters import MemoryCounters
from tests.conftest import wait_for
from tests.services import RedisServer

NOW = 1_780_000_000.0


class Loop:
    """The link hands what it read to the event loop; here, straight to the callable."""

    def call_soon_threadsafe(self, callback, *args) -> None:
        callback(*args)


class Node:
    """One node's Redis parts and its Governor, over `database` (what it seeds from and flushes to)."""

    def __init__(self, url: str, database: Path) -> None:
        local = MemoryCounters()
        conn = db.connect(database)
        try:
            local.restore(conn, time.time())
        finally:
            conn.close()
        self.health, self.counters, self.link = redis_shared.open_redis(url, database, local)
        self.link.loop = Loop()
        self.governor = Governor(self.counters)
        self.governor.reserved = redis_shared.RedisHolds(self.counters)

    def stop(self) -> None:
        self.link.stop()
        self.counters.stop()


@pytest.fixture
def nodes(redis_server: RedisServer, database: Path):
    made: list[Node] = []

    def make() -> Node:
        made.append(Node(redis_server.url, database))
        return made[-1]

    yield make
    for node in made:
        node.stop()


def test_an_rpm_is_exact_whichever_node_admits(nodes):
    a, b = nodes().governor, nodes().governor
    policy = ClientPolicy(rpm=5)
    outcomes = [(a if i % 2 else b).admit(f"f{i}", 7, policy, None, b"", None, NOW + i * 0.01) for i in range(12)]
    assert [isinstance(o, Ticket) for o in outcomes] == [True] * 5 + [False] * 7
    assert all(isinstance(o, Refusal) and o.code == "rate_limit_exceeded" for o in outcomes[5:])


def test_an_rpm_is_exact_when_nodes_admit_at_the_same_time(nodes):
    policy = ClientPolicy(rpm=10)
    governors = [nodes().governor for _ in range(3)]
    admitted: list[bool] = []
    lock = threading.Lock()

    def node(g: Governor, index: int) -> None:
        for i in range(25):
            outcome = g.admit(f"n{index}-{i}", 7, policy, None, b"", None, time.time())
            with lock:
                admitted.append(isinstance(outcome, Ticket))

    threads = [threading.Thread(target=node, args=(g, i)) for i, g in enumerate(governors)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 75
    assert sum(admitted) == 10


def test_parallel_requests_and_budget_holds_count_across_nodes(nodes):
    a, b = nodes().governor, nodes().governor
    parallel = ClientPolicy(max_parallel=2)
    assert isinstance(a.admit("p1", 3, parallel, None, b"", None, NOW), Ticket)
    assert isinstance(b.admit("p2", 3, parallel, None, b"", None, NOW), Ticket)
    assert isinstance(a.admit("p3", 3, parallel, None, b"", None, NOW), Refusal)
    b.settle("p2", None, None, NOW)
    assert isinstance(a.admit("p4", 3, parallel, None, b"", None, NOW), Ticket)

    budget = ClientPolicy(daily_tokens=1000)
    body = b'{"model": "m", "max_tokens": 400, "messages": []}'
    assert isinstance(a.admit("a", 5, budget, "m", body, None, NOW, path="/v1/chat/completions"), Ticket)
    assert isinstance(b.admit("b", 5, budget, "m", body, None, NOW, path="/v1/chat/completions"), Ticket)
    refused = a.admit("c", 5, budget, "m", body, None, NOW, path="/v1/chat/completions")
    assert isinstance(refused, Refusal) and refused.code == "insufficient_quota"
    a.settle("a", {"total_tokens": 30}, None, NOW + 1)
    b.settle("b", {"total_tokens": 20}, None, NOW + 1)
    name = a.spend_names(5, NOW)["day_tokens"]
    assert a.reserved.get(name) is None and b.reserved.get(name) is None
    assert a.counters.period_total(name) == 50 == b.counters.period_total(name)


def test_the_lease_holder_copies_counters_into_the_database_and_an_empty_redis_is_seeded_from_it(
    nodes, redis_server: RedisServer, database: Path
):
    node = nodes()
    policy = ClientPolicy(rpm=3, daily_tokens=10_000)
    now = time.time()
    assert isinstance(node.governor.admit("a", 9, policy, "m", b"{}", None, now, path="/v1/chat/completions"), Ticket)
    node.governor.settle("a", {"total_tokens": 42}, None, now)
    client = redis_shared.connect(redis_server.url)
    assert node.link._hold_lease(client)
    node.link._flush(client)
    node.link._flush(client)  # twice: nothing is added again
    name = node.governor.spend_names(9, now)["day_tokens"]
    conn = db.connect(database)
    assert conn.execute("SELECT value FROM limit_counters WHERE name = ?", (name,)).fetchone()[0] == 42
    assert conn.execute("SELECT sum(amount) FROM limit_windows WHERE name = 'rpm:9'").fetchone()[0] == 1
    conn.close()

    client.flushall()  # Redis restarted without its data: the next node seeds it from the database
    again = nodes()
    assert again.counters.period_total(name) == 42
    assert again.counters.moving_total("rpm:9", 60, now + 1)[0] == 1
    client.close()


def test_with_redis_down_a_node_counts_alone_then_replays_what_it_counted(nodes, redis_server: RedisServer):
    a, b = nodes(), nodes()
    a.link.start()  # its keeper tries Redis again while it is down
    b.link.start()
    policy = ClientPolicy(rpm=4, daily_tokens=10_000)
    now = time.time()
    body = b'{"max_tokens": 10}'
    assert isinstance(a.governor.admit("x", 2, policy, "m", body, None, now, path="/v1/chat/completions"), Ticket)
    assert isinstance(b.governor.admit("y", 2, policy, "m", body, None, now, path="/v1/chat/completions"), Ticket)
    redis_server.stop()
    started = time.monotonic()
    # Every call is bounded: the first one finds Redis gone, the rest do not wait for it at all.
    outcomes = [a.governor.admit(f"d{i}", 2, policy, None, b"", None, now + 0.1) for i in range(5)]
    assert time.monotonic() - started < 2
    assert not a.health.up and a.health.errors >= 1
    # a's local view: its own requests (and what it read of b's spend); its window has its own entries only.
    assert [isinstance(o, Ticket) for o in outcomes] == [True, True, True, False, False]
    a.governor.settle("d0", {"total_tokens": 7}, None, now + 0.2)
    redis_server.start()
    wait_for(lambda: a.health.up, 10, what="a rejoins Redis")
    wait_for(lambda: b.health.up, 10, what="b rejoins Redis")
    # What a counted meanwhile reached Redis: b sees it now (the empty Redis was seeded, then a replayed).
    assert b.counters.moving_total("rpm:2", 60, now + 1)[0] >= 3
    assert b.counters.period_total(a.governor.spend_names(2, now)["day_tokens"]) >= 7


def test_a_key_state_rests_and_admin_changes_reach_the_other_node(nodes, redis_server: RedisServer):
    a, b = nodes(), nodes()
    received: list = []
    revisions: list[bool] = []
    b.link.deliver = received.extend
    b.link.deliver_revision = lambda: revisions.append(True)
    a.link.start()
    b.link.start()
    change = KeyStateChange(4, KeyState.INVALID, "401 invalid_api_key", None, NOW)
    rests = [Rested("gpt-4o", 4, NOW + 30, "429 rate_limit"), Rested(None, None, NOW + 5, "pool-wide", True)]
    a.link.publish_state(change)
    a.link.publish_rests(2, rests)
    wait_for(lambda: len(received) == 3, what="the other node told")
    assert received == [change, (2, rests[0]), (2, rests[1])]
    redis_shared.RevisionPublisher(redis_server.url)("keys")  # the CLI or the UI changed a key
    wait_for(lambda: revisions, what="the admin change announced")


def test_what_is_published_while_redis_is_down_arrives_when_it_returns(nodes, redis_server: RedisServer):
    a, b = nodes(), nodes()
    received: list = []
    b.link.deliver = received.extend
    a.link.start()
    b.link.start()
    redis_server.stop()
    change = KeyStateChange(5, KeyState.EXHAUSTED, "429 insufficient_quota", None, NOW)
    a.link.publish_state(change)
    wait_for(lambda: not a.health.up, what="a finds Redis gone")
    redis_server.start()
    wait_for(lambda: received == [change], 15, what="the change sent once Redis returned")


def test_requests_in_flight_reach_the_other_node_for_least_used(nodes):
    a, b = nodes(), nodes()
    counted: list[dict[int, int]] = []
    b.link.deliver_in_flight = counted.append
    a.link.start()
    b.link.start()
    b.link.publish_in_flight({})
    a.link.publish_in_flight({4: 3, 5: 1})
    wait_for(lambda: counted and counted[-1] == {4: 3, 5: 1}, what="the other node's requests in flight")
    a.link.publish_in_flight({5: 1})
    wait_for(lambda: counted[-1] == {5: 1}, what="the ended ones gone")


def test_redis_down_at_start_is_said_once_and_the_ui_sees_it(redis_server: RedisServer, database: Path, caplog):
    url = redis_server.url
    redis_server.stop()
    node = Node(url, database)
    try:
        assert not node.health.up
        assert isinstance(node.governor.admit("a", 1, ClientPolicy(rpm=1), None, b"", None, NOW), Ticket)
        assert isinstance(node.governor.admit("b", 1, ClientPolicy(rpm=1), None, b"", None, NOW), Refusal)
        warnings = [r for r in caplog.records if "REDIS UNREACHABLE" in r.getMessage()]
        assert len(warnings) == 1
        seen = redis_shared.view(url, database, time.time())
        assert seen is not None and not seen.up and seen.nodes_down == 1
        redis_server.start()
        node.link.start()
        wait_for(lambda: node.health.up, 10, what="the node joins Redis")
        node.health.write_status()
        seen = redis_shared.view(url, database, time.time())
        assert seen is not None and seen.up
    finally:
        node.stop()


def test_a_password_in_the_url_is_never_shown():
    from config import masked_url

    assert masked_url("redis://:s3cret@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert masked_url("redis://user:s3cret@host/1") == "redis://user:***@host/1"
    assert masked_url("redis://host:6379/0") == "redis://host:6379/0"


def test_a_lock_left_by_a_dead_node_refuses_briefly_then_expires(nodes, redis_server: RedisServer):
    node = nodes()
    client = redis_shared.connect(redis_server.url)
    client.set(redis_shared.PREFIX + "lock", "a-node-that-died", px=redis_shared.LOCK_MS)
    policy = ClientPolicy(rpm=5)
    started = time.monotonic()
    refused = node.governor.admit("a", 1, policy, None, b"", None, NOW)
    assert isinstance(refused, Refusal) and refused.code == "limits_unavailable"  # a 503 with Retry-After
    assert time.monotonic() - started < 1  # waited LOCK_WAIT_SECONDS, not for ever
    assert node.health.up  # a busy lock is not an outage
    wait_for(lambda: not client.exists(redis_shared.PREFIX + "lock"), 2, what="the lock expired")
    assert isinstance(node.governor.admit("b", 1, policy, None, b"", None, NOW), Ticket)
    client.close()


def test_an_emptied_redis_is_seeded_again_by_the_next_heartbeat(nodes, redis_server: RedisServer, database: Path):
    conn = db.connect(database)
    with conn:
        conn.execute("INSERT INTO limit_counters (name, value, updated_at) VALUES ('spend:3:tokens:day:x', 70, 0)")
    conn.close()
    node = nodes()
    assert node.counters.period_total("spend:3:tokens:day:x") == 70
    client = redis_shared.connect(redis_server.url)
    client.flushall()  # an operator, or a restart the node never saw
    node.link._heartbeat(client)
    wait_for(lambda: client.exists(redis_shared.PREFIX + "seeded"), what="seeded again")
    assert node.counters.period_total("spend:3:tokens:day:x") == 70
    client.close()


def test_a_token_window_is_settled_to_what_upstream_reported_and_empties_after_a_minute(nodes):
    a, b = nodes().governor, nodes().governor
    policy = ClientPolicy(tpm=1000)
    body = b'{"max_tokens": 400}'
    now = time.time()
    assert isinstance(a.admit("x", 4, policy, None, body, None, now), Ticket)
    assert b.counters.moving_total("tpm:4", 60, now)[0] == estimate_tokens(body)  # the estimate, held
    a.settle("x", {"total_tokens": 30}, None, now + 1)
    assert b.counters.moving_total("tpm:4", 60, now + 1)[0] == 30  # settled, seen by the other node
    assert b.counters.moving_total("tpm:4", 60, now + 59.99)[0] == 30  # never leaves before its minute
    assert b.counters.moving_total("tpm:4", 60, now + 62)[0] == 0


def test_the_lease_holder_drops_calendar_totals_long_ended(nodes, redis_server: RedisServer):
    node = nodes()
    today = node.governor.spend_names(1, time.time())
    with node.counters.atomic():  # in Redis at once (outside a decision, the link's publisher sends them)
        for name in (
            "spend:1:tokens:day:2020-01-01",
            "spend:1:usd:month:2020-01",
            today["day_tokens"],
            today["month_usd"],
        ):
            node.counters.period_add(name, 5)
    client = redis_shared.connect(redis_server.url)
    node.link._purge(client)
    kept = {name.decode() for name in client.hkeys(redis_shared.PREFIX + "p")}
    assert kept == {today["day_tokens"], today["month_usd"]}
    client.close()


def spent(database: Path, name: str) -> float | None:
    """A calendar total as the database holds it (what the pages and the CLI show)."""
    conn = db.connect(database)
    try:
        row = conn.execute("SELECT value FROM limit_counters WHERE name = ?", (name,)).fetchone()
    finally:
        conn.close()
    return row[0] if row else None


def test_spend_no_limit_weighs_reaches_the_other_nodes_from_the_publisher_not_the_event_loop(
    nodes, redis_server: RedisServer
):
    a, b = nodes(), nodes()
    now = time.time()
    assert isinstance(a.governor.admit("x", 6, ClientPolicy(), "m", b"{}", None, now), Ticket)
    a.governor.settle("x", {"total_tokens": 30}, 0.25, now)
    names = a.governor.spend_names(6, now)
    client = redis_shared.connect(redis_server.url)
    assert not client.hexists(redis_shared.PREFIX + "p", names["day_tokens"])  # no round trip as it settled
    assert a.counters.period_total(names["day_tokens"]) == 30  # the node that counted it sees it at once
    a.link.start()
    wait_for(lambda: b.counters.period_total(names["day_tokens"]) == 30, 2, what="the spend sent")
    assert [b.counters.period_total(names[n]) for n in ("month_tokens", "day_usd", "month_usd")] == [30, 0.25, 0.25]
    client.close()


def test_spend_settled_while_redis_is_down_waits_and_reaches_redis_and_the_database_once(
    nodes, redis_server: RedisServer, database: Path
):
    a, b = nodes(), nodes()
    a.link.start()
    b.link.start()
    now = time.time()
    name = a.governor.spend_names(7, now)["day_tokens"]
    redis_server.stop()
    for i in range(3):
        assert isinstance(a.governor.admit(f"x{i}", 7, ClientPolicy(), "m", b"{}", None, now), Ticket)
        a.governor.settle(f"x{i}", {"total_tokens": 10}, None, now)
    wait_for(lambda: not a.health.up, what="a finds Redis gone")  # its publisher's send failed
    assert a.counters.period_total(name) == 30  # its local view
    redis_server.start()  # empty: seeded from the database, which has none of it
    wait_for(lambda: a.health.up and b.health.up, 10, what="both rejoin Redis")
    wait_for(lambda: b.counters.period_total(name) == 30, 5, what="the spend sent once Redis answered")
    wait_for(lambda: spent(database, name) == 30, 5, what="the lease holder's copy in the database")
    assert not a.counters.take_later()  # nothing left to send again
    assert b.counters.period_total(name) == 30


def test_a_node_stopped_while_redis_is_down_saves_its_unsent_spend_in_the_database_once(
    nodes, redis_server: RedisServer, database: Path
):
    node = nodes()
    node.link.start()
    now = time.time()
    budget = ClientPolicy(daily_tokens=10_000)
    assert isinstance(node.governor.admit("b", 2, budget, "m", b"{}", None, now, path="/v1/chat/completions"), Ticket)
    assert isinstance(node.governor.admit("f", 3, ClientPolicy(), "m", b"{}", None, now), Ticket)
    redis_server.stop()
    node.governor.settle("f", {"total_tokens": 11}, 0.5, now)  # waits for the publisher, which cannot send
    node.governor.settle("b", {"total_tokens": 7}, None, now)  # a decision: counted locally, pending
    assert not node.health.up
    node.stop()
    free, budgeted = node.governor.spend_names(3, now), node.governor.spend_names(2, now)
    assert [spent(database, free[n]) for n in ("day_tokens", "month_tokens", "day_usd", "month_usd")] == [
        11,
        11,
        0.5,
        0.5,
    ]
    assert spent(database, budgeted["day_tokens"]) == 7
    node.stop()  # stopped again (as the fixture does): nothing is added twice
    assert spent(database, free["day_tokens"]) == 11 and spent(database, budgeted["day_tokens"]) == 7
