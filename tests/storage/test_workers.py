"""What workers share (storage/workers.py): exact limits over the shared file, key states and rests between them.

Two workers are two objects on the same file here, each with its own connection, as two
processes would be; tests/test_workers_integration.py runs real processes.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from core.limits import ClientPolicy, Governor, Refusal, Ticket
from core.models import KeyState, KeyStateChange
from core.pool import Rested
from storage import db, workers
from tests.conftest import wait_for

NOW = 1_780_000_000.0


@pytest.fixture
def shared(database: Path) -> Path:
    return workers.prepare(database, 2)


def governor(shared: Path, worker: int) -> Governor:
    counters = workers.SharedCounters(shared, worker)
    g = Governor(counters)
    g.reserved = workers.SharedHolds(counters)
    return g


def test_an_rpm_is_exact_whichever_worker_admits(shared: Path):
    a, b = governor(shared, 0), governor(shared, 1)
    policy = ClientPolicy(rpm=5)
    outcomes = [(a if i % 2 else b).admit(f"f{i}", 7, policy, None, b"", None, NOW + i * 0.01) for i in range(12)]
    assert [isinstance(o, Ticket) for o in outcomes] == [True] * 5 + [False] * 7
    assert all(isinstance(o, Refusal) and o.code == "rate_limit_exceeded" for o in outcomes[5:])


def test_an_rpm_is_exact_when_workers_admit_at_the_same_time(shared: Path):
    policy = ClientPolicy(rpm=10)
    admitted: list[bool] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        g = governor(shared, index)
        for i in range(25):
            outcome = g.admit(f"w{index}-{i}", 7, policy, None, b"", None, time.time())
            with lock:
                admitted.append(isinstance(outcome, Ticket))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert admitted.count(True) == 10 and len(admitted) == 50


def test_parallel_requests_count_across_workers_and_end_where_they_started(shared: Path):
    a, b = governor(shared, 0), governor(shared, 1)
    policy = ClientPolicy(max_parallel=2)
    assert isinstance(a.admit("a1", 3, policy, None, b"", None, NOW), Ticket)
    assert isinstance(b.admit("b1", 3, policy, None, b"", None, NOW), Ticket)
    assert isinstance(a.admit("a2", 3, policy, None, b"", None, NOW), Refusal)
    b.settle("b1", None, None, NOW + 1)
    assert isinstance(a.admit("a2", 3, policy, None, b"", None, NOW + 1), Ticket)


def test_a_restarted_worker_drops_what_its_killed_run_held(shared: Path):
    policy = ClientPolicy(max_parallel=1)
    assert isinstance(governor(shared, 1).admit("lost", 3, policy, None, b"", None, NOW), Ticket)
    other = governor(shared, 0)
    assert isinstance(other.admit("x", 3, policy, None, b"", None, NOW), Refusal)
    governor(shared, 1)  # worker 1 again, after a kill -9: its request in flight is gone
    assert isinstance(other.admit("x", 3, policy, None, b"", None, NOW), Ticket)


def test_budget_holds_and_spend_are_seen_by_every_worker(shared: Path):
    a, b = governor(shared, 0), governor(shared, 1)
    policy = ClientPolicy(daily_tokens=1000)
    body = b'{"model": "m", "max_tokens": 400, "messages": []}'
    assert isinstance(a.admit("a", 5, policy, "m", body, None, NOW, path="/v1/chat/completions"), Ticket)
    assert isinstance(b.admit("b", 5, policy, "m", body, None, NOW, path="/v1/chat/completions"), Ticket)
    held = dict(b.reserved)
    assert held and all(value > 800 for value in held.values())  # both requests' holds, from either side
    refused = a.admit("c", 5, policy, "m", body, None, NOW, path="/v1/chat/completions")
    assert isinstance(refused, Refusal) and refused.code == "insufficient_quota"
    a.settle("a", {"total_tokens": 30}, None, NOW + 1)
    b.settle("b", {"total_tokens": 20}, None, NOW + 1)
    assert dict(a.reserved) == {}
    assert a.counters.period_total(a.spend_names(5, NOW)["day_tokens"]) == 50


def test_a_moving_window_read_from_its_running_total_equals_its_entries_summed(database: Path, shared: Path):
    """Two workers add, adjust and read one window at clocks a little apart, out of order, across
    the flush that drops entries older than any window: every read is what summing gives."""
    rng = random.Random(22)
    a, b = workers.SharedCounters(shared, 0), workers.SharedCounters(shared, 1)
    entries: dict[object, tuple[float, float]] = {}  # handle: (at, amount), as added and adjusted
    conn, main = workers.connect(shared), db.connect(database)
    now = NOW
    for step in range(600):
        now += rng.choice((0.01, 0.05, 0.3, 2.0))
        counters = rng.choice((a, b))
        at = now - rng.random()  # a worker whose clock was read a moment before another's (it waited for the lock)
        with counters.atomic():
            total, oldest = counters.moving_total("tpm:1", 60, at)
            summed = [(t, n) for t, n in entries.values() if t > at - 60]
            assert total == pytest.approx(sum(n for _, n in summed), abs=1e-6), step
            assert oldest == (min(t for t, _ in summed) if summed else None)
            amount = float(rng.randint(1, 500))
            entries[counters.moving_add("tpm:1", amount, at)] = (at, amount)
        if rng.random() < 0.3:
            handle = rng.choice(list(entries))
            settled = float(rng.randint(1, 500))
            with counters.atomic():
                counters.moving_adjust("tpm:1", handle, settled)
            entries[handle] = (entries[handle][0], settled)
        if step % 100 == 99:
            workers.flush(conn, main, now + workers.MOVING_KEEP_SECONDS - 30)  # some entries leave for good
            entries = {h: e for h, e in entries.items() if e[0] > now - 30}
    conn.close()
    main.close()


def test_worker_zero_copies_counters_into_the_database_and_a_new_start_restores_them(database: Path, shared: Path):
    g = governor(shared, 0)
    policy = ClientPolicy(rpm=3, daily_tokens=10_000)
    now = time.time()
    assert isinstance(g.admit("a", 9, policy, "m", b"{}", None, now, path="/v1/chat/completions"), Ticket)
    g.settle("a", {"total_tokens": 42}, None, now)
    conn, main = workers.connect(shared), db.connect(database)
    workers.flush(conn, main, now)
    workers.flush(conn, main, now)  # twice: nothing is added again
    name = g.spend_names(9, now)["day_tokens"]
    assert main.execute("SELECT value FROM limit_counters WHERE name = ?", (name,)).fetchone()[0] == 42
    assert main.execute("SELECT sum(amount) FROM limit_windows WHERE name = 'rpm:9'").fetchone()[0] == 1
    conn.close()
    main.close()

    again = governor(workers.prepare(database, 2), 1)  # the next start of the workers
    assert again.counters.period_total(name) == 42
    assert again.counters.moving_total("rpm:9", 60, now + 1)[0] == 1


def test_a_key_state_and_rests_reach_the_other_worker(database: Path, shared: Path):
    received: list = []

    class Loop:  # the link hands what it read to the event loop; here, straight to the list
        def call_soon_threadsafe(self, deliver, learnt) -> None:
            deliver(learnt)

    sender = workers.WorkerLink(shared, database, 0)
    listener = workers.WorkerLink(shared, database, 1)
    listener.loop, listener.deliver = Loop(), received.extend
    sender.start()
    listener.start()
    try:
        change = KeyStateChange(4, KeyState.INVALID, "401 invalid_api_key", None, NOW)
        rests = [Rested("gpt-4o", 4, NOW + 30, "429 rate_limit"), Rested(None, None, NOW + 5, "pool-wide", True)]
        started = time.monotonic()
        sender.publish_state(change)
        sender.publish_rests(2, rests)
        wait_for(lambda: len(received) == 3, what="the other worker told")
        assert time.monotonic() - started < 5  # docs/workers.md says 50 ms; the machine may be loaded
        assert received == [change, (2, rests[0]), (2, rests[1])]
    finally:
        sender.stop()
        listener.stop()


def test_spend_no_admission_weighs_goes_with_the_link_and_a_budgets_spend_at_once(database: Path, shared: Path):
    a, b = governor(shared, 0), governor(shared, 1)
    link = workers.WorkerLink(shared, database, 1)
    link.counters = b.counters  # type: ignore[assignment]
    unlimited, budgeted = ClientPolicy(), ClientPolicy(daily_tokens=100)
    now = time.time()
    names = {client: a.spend_names(client, now)["day_tokens"] for client in (5, 6)}

    b.count("free", 5, unlimited, None, now)
    b.settle("free", {"total_tokens": 30}, None, now)
    assert b.counters.period_total(names[5]) == 30  # the worker that settled counts it at once
    assert a.counters.period_total(names[5]) == 0  # the other one once the link wrote it
    link.start()
    try:
        wait_for(lambda: a.counters.period_total(names[5]) == 30, what="the link writing the spend")
    finally:
        link.stop()

    assert isinstance(b.admit("paid", 6, budgeted, None, b"", None, now), Ticket)
    b.settle("paid", {"total_tokens": 120}, None, now)
    assert a.counters.period_total(names[6]) == 120  # a budget's spend: in the settling transaction
    assert isinstance(a.admit("over", 6, budgeted, None, b"", None, now), Refusal)


def test_spend_left_for_the_link_is_written_when_the_worker_stops(database: Path, shared: Path):
    b = governor(shared, 1)
    now = time.time()
    b.count("free", 5, ClientPolicy(), None, now)
    b.settle("free", {"total_tokens": 12}, None, now)
    b.counters.stop()  # no link ran: stopping writes it
    assert governor(shared, 0).counters.period_total(b.spend_names(5, now)["day_tokens"]) == 12


def test_the_shared_file_is_private(shared: Path):
    assert shared.stat().st_mode & 0o777 == 0o600
    with pytest.raises(sqlite3.OperationalError):
        workers.connect(shared).execute("SELECT * FROM flows")  # nothing of the database is in it


def test_requests_in_flight_reach_the_other_worker_for_least_used(database: Path, shared: Path):
    counted: list[dict[int, int]] = []

    class Loop:
        def call_soon_threadsafe(self, deliver, value) -> None:
            deliver(value)

    first = workers.WorkerLink(shared, database, 0)
    second = workers.WorkerLink(shared, database, 1)
    second.loop, second.deliver_in_flight = Loop(), counted.append
    first.start()
    second.start()
    try:
        second.publish_in_flight({})  # least_used: every worker tells its own, and reads the others'
        first.publish_in_flight({4: 3, 5: 1})
        wait_for(lambda: counted and counted[-1] == {4: 3, 5: 1}, what="the other worker's requests in flight")
        first.publish_in_flight({5: 1})
        wait_for(lambda: counted[-1] == {5: 1}, what="the ended ones gone")
    finally:
        first.stop()
        second.stop()


def test_the_ui_adds_up_every_workers_capture_status(database: Path):
    from storage import capture_status

    zero, one = capture_status.StatusFile(database, 0), capture_status.StatusFile(database, 1)
    zero.update(dropped=2, last_drop_at=NOW, last_drop_reason="old")
    one.update(dropped=3, last_drop_at=NOW + 5, last_drop_reason="newer", waiting=4, failing_since=NOW, error="locked")
    status = capture_status.read(database)
    assert (status.dropped, status.waiting, status.last_drop_reason, status.error) == (5, 4, "newer", "locked")
    assert status.failing_now(time.time())
    zero.close()
    one.close()


def test_counters_the_workers_cannot_reach_refuse_the_request_rather_than_let_it_through(shared: Path):
    g = governor(shared, 0)
    holder = workers.connect(shared)
    holder.execute("BEGIN IMMEDIATE")  # another worker stuck inside a transaction
    g.counters.conn.execute("PRAGMA busy_timeout = 50")
    try:
        refused = g.admit("a", 1, ClientPolicy(rpm=5), None, b"", None, NOW)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert isinstance(refused, Refusal) and refused.code == "limits_unavailable" and refused.error.status == 503
    assert refused.error.headers["retry-after"] == "1"
    assert isinstance(g.admit("a", 1, ClientPolicy(rpm=5), None, b"", None, NOW), Ticket)  # and then it counts


def test_a_worker_that_replaces_a_dead_one_learns_the_rests_still_running(database: Path, shared: Path):
    received: list = []

    class Loop:
        def call_soon_threadsafe(self, deliver, learnt) -> None:
            deliver(learnt)

    dead = workers.WorkerLink(shared, database, 1)
    dead.start()
    rest = Rested("gpt-4o", 4, time.time() + 30, "429 rate_limit")
    dead.publish_rests(2, [rest])
    dead.stop()  # as if killed after telling the others

    replacement = workers.WorkerLink(shared, database, 1)
    replacement.loop, replacement.deliver = Loop(), received.extend
    replacement.start()
    try:
        wait_for(lambda: received == [(2, rest)], what="the predecessor's rest")
    finally:
        replacement.stop()


def test_a_worker_without_its_supervisor_says_how_to_start_workers(database: Path):
    with pytest.raises(ValueError, match=r"run.py proxy --workers N"):
        workers.SharedCounters(workers.path_of(database), 0)
