"""What one request, one client or one model can do to a pool: scopes, attribution, shares, probes."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.classify import OK, Outcome
from core.metadata import KeyUse
from core.models import PoolKey
from core.pool import CLIENT_SHARE, Policy, Pool, Probe
from core.rotation import Rotation, RotationSettings

NOW = 1_800_000_000.0
LIMITED = Outcome("rate_limited", "429 rate_limit_exceeded", 20)
LIMITED_NO_HINT = Outcome("rate_limited", "429 rate_limit_exceeded", None)
SERVER_ERROR = Outcome("server_error", "500 server_error")


def make_pool(count: int = 3, policy: Policy | None = None) -> Pool:
    pool = Pool(policy or Policy())
    pool.replace_keys([PoolKey(i, f"sk-{i}", f"000{i}", "active", None, None, 1.0, 0) for i in range(1, count + 1)])
    for runtime in pool.runtime.values():
        runtime.proven = True
    return pool


def make_rotation(count: int = 3, **policy) -> Rotation:
    rotation = Rotation(make_pool(count))
    rotation.configure(RotationSettings(policy=Policy(**policy)))
    return rotation


def attempt(rotation: Rotation, use: KeyUse, key_id: int, outcome: Outcome | None, status: int | None) -> None:
    rotation.begin(use, rotation.pool.by_id[key_id], scope="gpt-4o")
    rotation.end(use, outcome, status, None if status else "reset")


def test_a_rate_limit_rests_the_key_for_its_model_only():
    pool = make_pool(1)
    key = pool.keys[0]
    (change,) = pool.learn(key, LIMITED, NOW, scope="gpt-4o")
    assert change.state == key.state == "active"  # for every other model
    assert change.reason == "429 rate_limit_exceeded (gpt-4o)"
    assert pool.pick("round_robin", NOW + 1, scope="gpt-4o") is None
    assert pool.pick("round_robin", NOW + 1, scope="gpt-4o-mini") is key
    assert pool.soonest_return(NOW + 1, "gpt-4o") == pytest.approx(19)
    assert pool.started(pool.pick("round_robin", NOW + 21, scope="gpt-4o"), NOW + 21, "gpt-4o") == Probe.KEY
    assert pool.pick("round_robin", NOW + 21, scope="gpt-4o") is None  # the probe is out
    pool.learn(key, OK, NOW + 21, Probe.KEY, "gpt-4o")
    assert pool.pick("round_robin", NOW + 21, scope="gpt-4o") is key


def test_a_pool_wide_429_without_a_hint_rests_that_model_about_a_second_not_a_minute():
    pool = make_pool(2)
    for key in pool.keys:
        pool.learn(key, LIMITED_NO_HINT, NOW, scope="gpt-4o")
    rest = pool.resting("gpt-4o", NOW)
    assert rest is not None and rest.until - NOW == pytest.approx(1.0)
    assert pool.pick("round_robin", NOW + 0.5, scope="gpt-4o") is None
    assert pool.pick("round_robin", NOW + 0.5, scope="gpt-4o-mini") is not None  # another model is untouched
    assert pool.pick("round_robin", NOW + 1.1, scope="gpt-4o") is not None
    for key in pool.keys:  # again without a success between: the backoff doubles
        pool.learn(key, LIMITED_NO_HINT, NOW + 2, scope="gpt-4o")
    assert pool.resting("gpt-4o", NOW + 2).until - (NOW + 2) == pytest.approx(2.0)


def test_upstream_trouble_rests_the_pool_with_one_probe_at_a_time_and_a_success_ends_it():
    pool = make_pool(3, Policy(failure_threshold=3))
    for n in range(3):
        pool.upstream_trouble("gpt-4o", NOW + n * 0.1, "503 server_error")
    assert [k.state for k in pool.keys] == ["active"] * 3  # no key is blamed
    probe = pool.pick("round_robin", NOW + 0.3, scope="gpt-4o")
    assert probe is not None and pool.started(probe, NOW + 0.3, "gpt-4o") == Probe.POOL
    assert pool.pick("round_robin", NOW + 0.3, scope="gpt-4o") is None  # one at a time
    assert pool.pick("round_robin", NOW + 0.3, scope="gpt-4o-mini") is not None
    pool.finished(probe)
    pool.upstream_trouble("gpt-4o", NOW + 0.4, "503 server_error", Probe.POOL)  # still down
    second = pool.pick("round_robin", NOW + 0.4, scope="gpt-4o")
    assert pool.started(second, NOW + 0.4, "gpt-4o") == Probe.POOL
    pool.finished(second)
    pool.learn(second, OK, NOW + 0.5, Probe.POOL, "gpt-4o")  # upstream is back
    assert pool.resting("gpt-4o", NOW + 0.5) is None
    assert pool.pick("round_robin", NOW + 0.5, scope="gpt-4o") is not None


def test_failures_everywhere_from_one_client_do_not_rest_the_pool():
    pool = make_pool(3, Policy(failure_threshold=3))
    for n in range(10):
        pool.upstream_trouble("gpt-4o", NOW + n, "500 server_error", client=7)
    assert pool.resting("gpt-4o", NOW + 10) is None  # its own requests may be what fails
    for client in (8, 9):
        pool.upstream_trouble("gpt-4o", NOW + 10, "500 server_error", client=client)
    assert pool.resting("gpt-4o", NOW + 10) is not None  # three clients failing in a row: upstream's


def test_a_failure_another_key_answers_is_the_first_keys_fault():
    rotation = make_rotation(2, failure_threshold=1)
    use = KeyUse()
    attempt(rotation, use, 1, SERVER_ERROR, 500)
    assert rotation.pool.runtime[1].scopes == {}  # not yet: it may follow the request
    attempt(rotation, use, 2, OK, 200)
    assert rotation.pool.runtime[1].health("gpt-4o").resting_until is not None
    assert rotation.pool.rests == {}


def test_a_failure_that_follows_the_request_to_a_second_key_marks_no_key():
    rotation = make_rotation(3, failure_threshold=1)
    for _ in range(5):  # many such requests in a row: the pool's trouble, not any key's
        use = KeyUse()
        attempt(rotation, use, 1, SERVER_ERROR, 500)
        attempt(rotation, use, 2, SERVER_ERROR, 500)
    assert all(not rt.scopes for rt in rotation.pool.runtime.values())
    assert [k.state for k in rotation.pool.keys] == ["active"] * 3
    assert rotation.pool.rests["gpt-4o"].probes


def test_one_requests_retries_on_the_same_key_count_once():
    rotation = make_rotation(1, failure_threshold=3)
    for _ in range(2):
        use = KeyUse()
        for _ in range(3):  # a one-key pool: every retry goes to the same key
            attempt(rotation, use, 1, SERVER_ERROR, 500)
        rotation.settle(use)
    assert rotation.pick_now("gpt-4o") is not None  # two requests are not three: still serving
    assert rotation.pool.resting("gpt-4o", time.time()) is None


def test_one_client_opens_the_breakers_of_at_most_its_share_of_the_pool():
    pool = make_pool(4, Policy(failure_threshold=1))
    rested = [pool.learn(k, SERVER_ERROR, NOW, scope=None, client=7) for k in pool.keys[:3]]
    assert [bool(r) for r in rested] == [True, True, False]  # half of four keys, then no more
    assert sum(k.state == "cooling" for k in pool.keys) == int(4 * CLIENT_SHARE)
    assert pool.learn(pool.keys[2], SERVER_ERROR, NOW, scope=None, client=8)  # another client's failure counts
    assert pool.learn(pool.keys[3], SERVER_ERROR, NOW + 61, scope=None, client=7)  # a new window


def test_a_rate_limit_rests_its_key_whoever_sent_the_request():
    pool = make_pool(4)
    assert all(pool.learn(k, LIMITED, NOW, scope=None, client=7) for k in pool.keys[:3])


def test_a_retry_never_goes_back_to_a_failed_key_while_a_busy_new_one_will_answer():
    pool = make_pool(2)
    pool.runtime[2].proven = False
    pool.started(pool.keys[1], NOW)  # key 2 is busy with its first request
    assert pool.pick("round_robin", NOW, exclude=frozenset({1})) is None
    assert pool.awaiting_proof(frozenset({1}))
    assert pool.pick("round_robin", NOW, exclude=frozenset({1}), busy_ok=True).id == 2


def test_waiting_ends_when_a_probe_brings_the_pool_back():
    rotation = make_rotation(2, failure_threshold=1)
    pool = rotation.pool
    now = time.time()
    pool.upstream_trouble("gpt-4o", now, "503")
    pool.rests["gpt-4o"].until = now + 60  # a long rest: only the probe's answer can end the wait
    probe_use = KeyUse()
    rotation.begin(probe_use, pool.pick("round_robin", now, scope="gpt-4o"), scope="gpt-4o")
    assert probe_use.probe == Probe.POOL

    async def scenario() -> None:
        waiter = asyncio.create_task(rotation.acquire(frozenset(), time.time() + 30, "gpt-4o"))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        rotation.end(probe_use, OK, 200, None)
        assert await asyncio.wait_for(waiter, 5) is not None

    asyncio.run(scenario())
