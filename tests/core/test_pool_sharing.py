"""Rests told to other workers (Pool.shared) and taken from them (Pool.absorb): each worker's pool rests alike."""

from __future__ import annotations

from core.classify import OK, Outcome
from core.models import PoolKey
from core.pool import Policy, Pool, Probe, Rested

NOW = 1_700_000_000.0
MODEL = "gpt-4o"
RATE_LIMITED = Outcome("rate_limited", "429 rate_limit_exceeded", 30)
SERVER_ERROR = Outcome("server_error", "500 server_error")


def worker_pool(count: int = 2, shared: bool = True, policy: Policy | None = None) -> Pool:
    pool = Pool(policy or Policy(pool_429_window_seconds=0))
    pool.replace_keys([PoolKey(i, f"sk-{i}", f"000{i}", "active", None, None, 1.0, 0) for i in range(1, count + 1)])
    if shared:
        pool.shared = []
    return pool


def told(pool: Pool) -> list[Rested]:
    rests = list(pool.shared or [])
    if pool.shared is not None:
        pool.shared.clear()
    return rests


def test_one_process_keeps_its_rests_to_itself():
    pool = worker_pool(shared=False)
    pool.learn(pool.by_id[1], RATE_LIMITED, NOW, scope=MODEL)
    assert pool.shared is None


def test_a_key_resting_for_a_model_rests_in_the_other_worker_for_that_model_only():
    first, second = worker_pool(), worker_pool()
    first.learn(first.by_id[1], RATE_LIMITED, NOW, scope=MODEL)
    (rest,) = told(first)
    assert rest == Rested(MODEL, 1, NOW + 30, "429 rate_limit_exceeded")

    second.absorb(rest, NOW)

    assert {second.pick("round_robin", NOW + 1, scope=MODEL).id for _ in range(4)} == {2}
    assert second.by_id[1] in [second.pick("round_robin", NOW + 1, scope="gpt-4o-mini") for _ in range(2)]
    assert second.pick("round_robin", NOW + 31, scope=MODEL, only=1) is not None  # until it ends


def test_a_pool_wide_rest_and_its_end_reach_the_other_worker():
    first = worker_pool(policy=Policy(pool_429_window_seconds=10))
    second = worker_pool()
    for key_id in (1, 2):
        first.learn(first.by_id[key_id], RATE_LIMITED, NOW, scope=MODEL)
    pool_rest = [r for r in told(first) if r.key_id is None]
    assert pool_rest and pool_rest[-1].until > NOW

    second.absorb(pool_rest[-1], NOW)
    assert second.pick("round_robin", NOW + 0.5, scope=MODEL) is None

    second.absorb(Rested(MODEL, None, 0.0), NOW + 0.6)  # a probe got through in the first worker
    assert second.pick("round_robin", NOW + 0.6, scope=MODEL) is not None


def test_while_one_worker_probes_a_resting_pool_the_other_sends_no_probe():
    first, second = worker_pool(policy=Policy(failure_threshold=1)), worker_pool()
    first.upstream_trouble(MODEL, NOW, "500 server_error")
    (rest,) = told(first)
    assert rest.probes and rest.key_id is None
    second.absorb(rest, NOW)
    later = rest.until - 0.001  # still resting: one probe at a time may go
    probe_key = first.pick("round_robin", later, scope=MODEL)
    assert first.started(probe_key, later, MODEL) == Probe.POOL
    (probing,) = told(first)
    assert probing.probing

    second.absorb(probing, later)

    assert second.pick("round_robin", later, scope=MODEL) is None  # the first worker's probe is out
    first.learn(probe_key, OK, later, Probe.POOL, MODEL)
    (back,) = told(first)
    second.absorb(back, later)
    assert second.pick("round_robin", later, scope=MODEL) is not None


def test_a_rest_of_a_key_this_worker_does_not_have_changes_nothing():
    pool = worker_pool()
    pool.absorb(Rested(MODEL, 99, NOW + 30, "429"), NOW)
    assert 99 not in pool.runtime and pool.pick("round_robin", NOW, scope=MODEL) is not None


def test_least_used_counts_the_other_workers_requests_in_flight():
    pool = worker_pool(3)
    pool.runtime[1].elsewhere = 4
    pool.runtime[2].elsewhere = 1
    assert pool.pick("least_used", NOW).id == 3
    pool.runtime[3].elsewhere = 2
    assert pool.pick("least_used", NOW).id == 2


def test_a_rotation_tells_the_other_workers_as_its_probe_goes_out_and_as_it_ends():
    import time

    from core.metadata import KeyUse
    from core.rotation import Rotation

    told_to: list[tuple[int, list[Rested]]] = []

    class Sink:
        def save_rests(self, group_id: int, rests: list[Rested]) -> None:
            told_to.append((group_id, rests))

    rotation = Rotation(worker_pool(policy=Policy(failure_threshold=1)))
    rotation.group_id, rotation.rests = 3, Sink()
    rotation.pool.upstream_trouble(MODEL, time.time(), "500 server_error")
    rotation.share()
    assert told_to[-1][0] == 3 and told_to[-1][1][0].probes

    use = KeyUse()
    key = rotation.pool.pick("round_robin", time.time(), scope=MODEL)
    rotation.begin(use, key, scope=MODEL)
    assert told_to[-1][1] == [Rested(MODEL, None, told_to[0][1][0].until, told_to[0][1][0].reason, True, True)]

    rotation.end(use, OK, 200, None)
    assert told_to[-1][1] == [Rested(MODEL, None, 0.0)]  # the probe got through: the pool serves again
