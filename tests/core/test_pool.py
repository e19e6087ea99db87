"""Pool: strategies, probes, circuit breaker, pool-wide 429s and reloads, without a proxy."""

from __future__ import annotations

from collections import Counter

import pytest

from core.classify import OK, Outcome
from core.models import PoolKey
from core.pool import Policy, Pool, Probe

NOW = 1_800_000_000.0
RATE_LIMITED = Outcome("rate_limited", "429 rate_limit_exceeded", 30)
SERVER_ERROR = Outcome("server_error", "500 server_error")


def make_pool(count: int = 3, policy: Policy | None = None, weights: list[float] | None = None) -> Pool:
    pool = Pool(policy or Policy())
    weights = weights or [1.0] * count
    pool.replace_keys(
        [PoolKey(i, f"sk-{i}", f"000{i}", "active", None, None, weights[i - 1], 0) for i in range(1, count + 1)]
    )
    return pool


def picks(pool: Pool, strategy: str, count: int, finish: bool = True) -> list[int]:
    chosen = []
    for _ in range(count):
        key = pool.pick(strategy, NOW)
        pool.started(key, NOW)
        if finish:
            pool.finished(key)
        chosen.append(key.id)
    return chosen


def test_round_robin_goes_through_the_keys_in_order():
    assert picks(make_pool(), "round_robin", 7) == [1, 2, 3, 1, 2, 3, 1]


def test_weighted_gives_each_key_its_share_spread_out():
    pool = make_pool(3, weights=[5, 1, 1])
    chosen = picks(pool, "weighted", 70)
    assert Counter(chosen) == {1: 50, 2: 10, 3: 10}
    assert chosen[:7].count(1) == 5 and "1, 1, 1, 1, 1" not in str(chosen[:7])  # smooth, not bursts


def test_least_used_prefers_fewest_in_flight_then_fewest_recent():
    pool = make_pool()
    assert picks(pool, "least_used", 3, finish=False) == [1, 2, 3]
    pool.finished(pool.by_id[2])
    assert pool.pick("least_used", NOW).id == 2  # the only one with nothing in flight
    for key in pool.keys:
        pool.finished(key)
    pool.started(pool.by_id[2], NOW)
    pool.finished(pool.by_id[2])
    assert pool.pick("least_used", NOW).id in (1, 3)  # key 2 has the most recent requests now


def test_random_only_picks_usable_keys():
    pool = make_pool()
    pool.keys[0].state = "invalid"
    assert {pool.pick("random", NOW).id for _ in range(50)} == {2, 3}


def test_a_retry_prefers_keys_it_has_not_tried():
    pool = make_pool()
    assert pool.pick("round_robin", NOW, exclude=frozenset({1, 2})).id == 3
    assert pool.pick("round_robin", NOW, exclude=frozenset({1, 2, 3})) is not None  # all tried: any usable one


@pytest.mark.parametrize(
    "outcome, state",
    [
        (Outcome("invalid", "401 invalid_api_key"), "invalid"),
        (Outcome("exhausted", "429 insufficient_quota"), "exhausted"),
        (RATE_LIMITED, "cooling"),
        (OK, "active"),
        (None, "active"),
    ],
)
def test_outcomes_move_the_key(outcome, state):
    pool = make_pool()
    key = pool.keys[0]
    changes = pool.learn(key, outcome, NOW, probe=False)
    assert key.state == state
    assert [c.state for c in changes] == ([] if state == "active" else [state])


def test_a_429_without_a_hint_backs_off_exponentially_up_to_the_maximum():
    pool = make_pool(policy=Policy(cooldown_seconds=10, max_cooldown_seconds=35, pool_429_window_seconds=0))
    key = pool.keys[0]
    ends = []
    for _ in range(4):
        pool.learn(key, Outcome("rate_limited", "429", None), NOW, probe=False)
        ends.append(key.cooldown_until - NOW)
    assert ends == [10, 20, 35, 35]
    pool.learn(key, OK, NOW, probe=True)
    pool.learn(key, Outcome("rate_limited", "429", None), NOW, probe=False)
    assert key.cooldown_until - NOW == 10  # a success resets the backoff


def test_the_circuit_breaker_opens_after_n_failures_and_a_success_resets_the_count():
    pool = make_pool(policy=Policy(failure_threshold=3, failure_cooldown_seconds=30))
    key = pool.keys[0]
    pool.learn(key, SERVER_ERROR, NOW, probe=False)
    pool.learn(key, SERVER_ERROR, NOW, probe=False)
    pool.learn(key, OK, NOW, probe=False)
    pool.learn(key, SERVER_ERROR, NOW, probe=False)
    pool.learn(key, SERVER_ERROR, NOW, probe=False)
    assert key.state == "active"
    changes = pool.learn(key, Outcome("connection_error", "reset"), NOW, probe=False)
    assert key.state == "cooling" and key.cooldown_until == NOW + 30
    assert changes[0].reason == "circuit open: reset"


def test_after_the_cooldown_one_probe_goes_out_and_its_answer_decides():
    pool = make_pool(1, policy=Policy(failure_threshold=1, failure_cooldown_seconds=30))
    key = pool.keys[0]
    pool.learn(key, SERVER_ERROR, NOW, probe=False)
    later = NOW + 31
    assert pool.pick("round_robin", NOW + 29) is None
    assert pool.started(pool.pick("round_robin", later), later) == Probe.KEY  # the probe
    assert pool.pick("round_robin", later) is None  # others wait for the probe's answer
    pool.learn(key, SERVER_ERROR, later, probe=True)
    assert key.state == "cooling" and key.cooldown_until == later + 60  # failed probe: open again, longer
    pool.started(pool.pick("round_robin", later + 61), later + 61)
    pool.learn(key, OK, later + 61, probe=True)
    assert key.state == "active"


def test_a_late_success_does_not_undo_a_cooldown():
    pool = make_pool()
    key = pool.keys[0]
    pool.learn(key, RATE_LIMITED, NOW, probe=False)
    pool.learn(key, OK, NOW + 1, probe=False)  # sent before the 429 arrived
    assert key.state == "cooling"


def test_a_429_on_every_key_within_the_window_cools_the_pool_not_the_keys():
    pool = make_pool(3, policy=Policy(pool_429_window_seconds=10))
    pool.keys[2].state = "invalid"  # not usable anyway: does not count
    pool.learn(pool.keys[0], RATE_LIMITED, NOW, probe=False)
    assert pool.keys[0].state == "cooling"
    changes = pool.learn(pool.keys[1], Outcome("rate_limited", "429", 5), NOW + 2, probe=False)
    assert [k.state for k in pool.keys[:2]] == ["active", "active"]
    assert {c.state for c in changes} == {"active"} and changes[0].reason.startswith("pool-wide")
    assert pool.pick("round_robin", NOW + 3) is None
    assert pool.soonest_return(NOW + 3) == pytest.approx(4)
    assert pool.pick("round_robin", NOW + 8) is not None


def test_429s_further_apart_than_the_window_mark_each_key():
    pool = make_pool(2, policy=Policy(pool_429_window_seconds=10))
    pool.learn(pool.keys[0], Outcome("rate_limited", "429", 100), NOW, probe=False)
    pool.learn(pool.keys[1], RATE_LIMITED, NOW + 11, probe=False)
    assert [k.state for k in pool.keys] == ["cooling", "cooling"]
    assert pool.resting(None, NOW + 11) is None


def test_disabled_keys_ignore_what_upstream_says():
    pool = make_pool()
    key = pool.keys[0]
    key.state = "disabled"
    assert pool.learn(key, Outcome("invalid", "401"), NOW, probe=False) == []
    assert key.state == "disabled"


def test_a_reload_keeps_newer_learnt_states_and_the_runtime_counters():
    pool = make_pool()
    key = pool.keys[0]
    pool.started(key, NOW)
    pool.learn(key, Outcome("invalid", "401"), NOW + 5, probe=False)
    stale = [PoolKey(i, f"sk-{i}", f"000{i}", "active", None, None, 1.0, 0, state_changed_at=NOW) for i in (1, 2, 3)]
    pool.replace_keys(stale)
    assert pool.by_id[1].state == "invalid"
    assert pool.runtime[1].in_flight == 1
    admin = [PoolKey(1, "sk-1", "0001", "active", "reset by admin", None, 1.0, 0, state_changed_at=NOW + 9)]
    pool.replace_keys(admin)
    assert pool.by_id[1].state == "active" and list(pool.by_id) == [1]


def test_a_key_not_yet_accepted_takes_one_request_at_a_time():
    pool = make_pool(2)
    first = pool.pick("round_robin", NOW)
    pool.started(first, NOW)
    second = pool.pick("round_robin", NOW)
    pool.started(second, NOW)
    assert pool.pick("round_robin", NOW) is None  # both busy with their first request
    assert pool.awaiting_proof()
    assert pool.pick("round_robin", NOW, busy_ok=True) is not None  # when waiting is not allowed
    pool.finished(first)
    pool.learn(first, OK, NOW, probe=False)
    pool.started(pool.pick("round_robin", NOW), NOW)
    assert pool.pick("round_robin", NOW).id == first.id  # accepted: now it takes many at once
