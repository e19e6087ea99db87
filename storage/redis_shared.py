"""What keyrotor nodes share through Redis (`[redis] url`): client limits, key states, rests, admin changes.

Several `run.py proxy` processes ("nodes", on one machine or many, each possibly with
workers) behind one load balancer use one Redis server (docs/redis.md):

- RedisCounters (core.ports.Counters) and RedisHolds (the Governor's budget holds): the
  numbers behind client limits. A Governor decision (`atomic()`) takes a short Redis lock at
  its first read, reads with small Lua scripts, and writes every add with the lock's release
  in one script: a limit is exact whichever node a request reaches. Spend no admission weighs
  (a client without a budget, a TPM or a parallel limit) is no round trip of the loop: the
  link's publisher sends what gathered within SPEND_SECONDS in one script. Nodes seed Redis with
  the totals the database kept; one node at a time (a lease) copies what changed back into
  the database every FLUSH_SECONDS, where the UI and the CLI read spend.
- RedisLink: key states and rests a node learns from upstream go into a Redis stream, which
  every node reads with a blocking XREAD (a change reaches the others in about a millisecond,
  and a node that was cut off reads on from where it was); requests in flight per key, for
  least_used; admin changes (revision bumps), so nodes reload at once rather than at their
  next poll.
- RedisHealth: whether Redis answers. Every Redis call is bounded by TIMEOUT_SECONDS; the first
  failure switches the node to its local view (the in-memory counters, as with one process)
  with one warning, counted in the status file the UI shows (`<db>.redis.<pid>`); a thread
  pings every RETRY_SECONDS and, once Redis answers, the node re-seeds it, replays what it
  counted meanwhile and resumes. No client request waits for Redis longer than the timeout,
  and only the first request of an outage waits at all.

Calls on the event loop are synchronous, as core.ports.Counters requires: a round trip to
Redis on the same network is 0.1-0.3 ms (bench/redis_propagation.py measures it).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from config import masked_url
from core.limits import CountersUnavailable
from core.models import KeyStateChange
from core.pool import Rested
from core.ports import PoolStateSink
from storage import counters as sqlite_counters
from storage import db
from storage.counters import MemoryCounters
from storage.workers import LaterAmounts, learnt, take_all

log = logging.getLogger(__name__)

PREFIX = "keyrotor:"
TIMEOUT_SECONDS = 0.25  # every call on the event loop: past it, Redis counts as down and the node goes on alone
THREAD_TIMEOUT_SECONDS = 1.0  # calls of the link's threads, off the request path
SEED_TIMEOUT_SECONDS = 30.0  # seeding an empty Redis with the database's totals (off the loop)
RETRY_SECONDS = 0.5  # while Redis is down, how often a node tries it again
SPEND_SECONDS = 0.05  # spend no admission weighs gathers this long before the publisher sends it, in one script
LOCK_MS = 500  # a decision's lock expires by itself if its node dies holding it
LOCK_WAIT_SECONDS = 0.25  # a decision waits this long for another node's; then limits_unavailable (503)
FLUSH_SECONDS = 1.0  # the lease holder copies counters into the database this often
LEASE_MS = 3000
NODE_TTL_SECONDS = 30  # a node that stopped heartbeating this long: its requests in flight and holds end
HEARTBEAT_SECONDS = 5.0
SEED_REFUSED = "it is empty and the database cannot be read to seed it"
STREAM_MAXLEN = 10_000
READ_BLOCK_MS = 20  # with least_used, the reader also reads the others' requests in flight this often
IDLE_BLOCK_MS = 1000  # otherwise it waits this long for events (an event ends the wait at once)
HISTORY_SECONDS = 60.0  # a starting node reads the events of the last minute: the rests still running
PENDING_MAX = 100_000  # adds counted locally during an outage, replayed when Redis returns
STATUS_SECONDS = 5.0
SEED_WINDOW_SECONDS = 61  # the moving windows the Governor uses are a minute long: older seconds are not seeded
STATUS_FRESH_SECONDS = 15.0

# KEYS are built inside the scripts from PREFIX: one Redis server (or a primary with replicas), not a cluster.

# Each read takes the decision's lock in the same round trip (ARGV[2]: its token; '' outside a decision).
LOCKED = """
local p, token = ARGV[1], ARGV[2]
if token ~= '' then
  local holder = redis.call('GET', p .. 'lock')
  if holder and holder ~= token then return {'busy'} end
  if not holder then redis.call('SET', p .. 'lock', token, 'PX', tonumber(ARGV[3])) end
end
"""

# A moving window is a hash of amounts per second (KEYS[1]): a total reads the window's seconds only,
# however many requests they hold. A second's amount leaves the window at the end of that second, as a
# window restored from the database does (storage/counters.py): never earlier than its requests.
TOTAL = (
    LOCKED
    + """
local since, now = tonumber(ARGV[4]), tonumber(ARGV[5])
local first, last = math.floor(since), math.floor(now)
local fields = {}
for second = first, last do fields[#fields + 1] = tostring(second) end
local amounts = redis.call('HMGET', KEYS[1], unpack(fields))
local total, oldest = 0, ''
for i, amount in ipairs(amounts) do
  local second = first + i - 1
  if amount and second + 1 > since then
    local value = tonumber(amount)
    total = total + value
    if oldest == '' and value > 0 then oldest = tostring(second + 1) end
  end
end
return {'ok', tostring(total), oldest}
"""
)

# Every gauge and hold, summed over the nodes: one read serves all of a decision's.
LEVELS = (
    LOCKED
    + """
local totals, order = {}, {}
for _, node in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  local flat = redis.call('HGETALL', p .. 'g:' .. node)
  for i = 1, #flat, 2 do
    local name = flat[i]
    if totals[name] == nil then
      totals[name] = 0
      order[#order + 1] = name
    end
    totals[name] = totals[name] + tonumber(flat[i + 1])
  end
end
local out = {'ok'}
for _, name in ipairs(order) do
  out[#out + 1] = name
  out[#out + 1] = tostring(totals[name])
end
return out
"""
)

PERIOD = (
    LOCKED
    + """
return {'ok', redis.call('HGET', p .. 'p', ARGV[4]) or '0'}
"""
)

COMMIT = """
local p, node = ARGV[1], ARGV[3]
local lost = 0
if ARGV[2] ~= '' then
  if redis.call('GET', p .. 'lock') == ARGV[2] then redis.call('DEL', p .. 'lock') else lost = 1 end
end
local g = p .. 'g:' .. node
for _, op in ipairs(cjson.decode(ARGV[4])) do
  local kind = op[1]
  if kind == 'w' then
    local w = p .. 'w:' .. op[2]
    redis.call('HINCRBYFLOAT', w, op[3], op[4])
    redis.call('HINCRBYFLOAT', p .. 'wd', op[2] .. '\\n' .. op[3], op[4])
    if redis.call('HLEN', w) > 180 then
      for _, second in ipairs(redis.call('HKEYS', w)) do
        if tonumber(second) < tonumber(op[3]) - 120 then redis.call('HDEL', w, second) end
      end
    end
    redis.call('EXPIRE', w, 120)
  elseif kind == 'p' then
    redis.call('HINCRBYFLOAT', p .. 'p', op[2], op[3])
    redis.call('SADD', p .. 'pd', op[2])
  elseif kind == 'g' then
    local v = tonumber(redis.call('HINCRBYFLOAT', g, op[2], op[3]))
    if v <= 1e-9 then redis.call('HDEL', g, op[2]) end
    redis.call('SADD', p .. 'nodes', node)
  end
end
return lost
"""

SEED = """
local p = ARGV[1]
if redis.call('EXISTS', p .. 'seeded') == 1 then return 0 end
local data = cjson.decode(ARGV[2])
for _, row in ipairs(data[1]) do redis.call('HSET', p .. 'p', row[1], row[2]) end
for _, row in ipairs(data[2]) do
  redis.call('HINCRBYFLOAT', p .. 'w:' .. row[1], row[2], row[3])
  redis.call('EXPIRE', p .. 'w:' .. row[1], 120)
end
redis.call('SET', p .. 'seeded', '1')
return 1
"""

TAKE = """
local p = ARGV[1]
local names = redis.call('SMEMBERS', p .. 'pd')
redis.call('DEL', p .. 'pd')
local periods = {}
for _, n in ipairs(names) do
  periods[#periods + 1] = n
  periods[#periods + 1] = redis.call('HGET', p .. 'p', n) or '0'
end
local windows = redis.call('HGETALL', p .. 'wd')
redis.call('DEL', p .. 'wd')
return {periods, windows}
"""


def connect(url: str, timeout: float = TIMEOUT_SECONDS) -> redis.Redis:
    """A client whose every call gives up after `timeout` (no retries: a failure is the caller's to handle);
    connecting gives up after a second at most, whatever `timeout` (a host that does not answer is down)."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 1.0), retry=Retry(NoBackoff(), 0)
    )


def status_path(db_path: str | Path, pid: int | None = None) -> Path:
    return Path(f"{db_path}.redis.{os.getpid() if pid is None else pid}")


@dataclass(frozen=True)
class RedisStatus:
    """What one node last wrote about its Redis: read by the UI (metrics, dashboard notice)."""

    up: bool = True
    errors: int = 0  # failed Redis calls since the node started
    down_since: float | None = None
    error: str | None = None
    updated_at: float = 0.0


def read_statuses(db_path: str | Path, now: float) -> list[RedisStatus]:
    """The fresh statuses of the nodes that write beside this database (stale ones are of gone processes)."""
    found = []
    base = Path(db_path)
    for path in sorted(base.parent.glob(f"{base.name}.redis.*")):
        with suppress(OSError, ValueError, TypeError):
            status = RedisStatus(**json.loads(path.read_text()))
            if now - status.updated_at <= STATUS_FRESH_SECONDS:
                found.append(status)
    return found


class RedisHealth:
    """Whether this node's Redis answers; the one place that says so, loudly, once per outage."""

    def __init__(self, url: str, db_path: Path | None) -> None:
        self.url = url
        self.shown = masked_url(url)
        self.db_path = db_path
        self.up = False
        self.errors = 0
        self.down_since: float | None = time.time()
        self.error: str | None = "not connected yet"
        self._lock = threading.Lock()
        self._warned = False

    def failed(self, error: BaseException) -> None:
        """A Redis call failed: from now on this node counts on its own until Redis answers again."""
        with self._lock:
            self.errors += 1
            if not self.up and self._warned:
                self.error = _reason(error)  # the dashboard shows the latest reason; the log said it once
                return
            self.up = False
            self._warned = True
            self.down_since = time.time()
            self.error = _reason(error)
        log.warning(
            "REDIS UNREACHABLE at %s (%s): this node now serves on its local view — client limits are counted"
            " by this node alone and key states reach other nodes only through the database — until Redis"
            " answers again",
            self.shown,
            self.error,
        )
        self.write_status()

    def recovered(self) -> None:
        with self._lock:
            was_down = self._warned
            self.up, self._warned, self.down_since, self.error = True, False, None, None
        if was_down:
            log.warning("Redis at %s answers again: limits, key states and rests are shared across nodes", self.shown)
        self.write_status()

    def status(self) -> RedisStatus:
        return RedisStatus(self.up, self.errors, self.down_since, self.error, time.time())

    def write_status(self) -> None:
        if self.db_path is None:
            return
        path = status_path(self.db_path)
        with suppress(OSError):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(asdict(self.status())))
            os.replace(tmp, path)

    def remove_status(self) -> None:
        if self.db_path is not None:
            with suppress(OSError):
                status_path(self.db_path).unlink()


def _reason(error: BaseException) -> str:
    # redis-py's messages name the host and port, never the password; cut to one line anyway.
    return (str(error) or type(error).__name__).splitlines()[0][:200]


@dataclass
class Entry:
    """A moving window's entry as RedisCounters hands it out: its second, its amount, and its local twin."""

    second: int
    amount: float
    local: object


Op = list[Any]


class RedisCounters:
    """core.ports.Counters across nodes, with this node's in-memory counters as its view when Redis is down.

    Everything this node adds is also added to `local` (MemoryCounters), and every calendar
    total read from Redis is copied into it, so that the local view is current when Redis goes
    away. Gauges and budget holds are kept per node in Redis (`g:<node>`, summed when read):
    this node's own share is always known here, and a node that dies takes its share with it.
    """

    def __init__(self, health: RedisHealth, local: MemoryCounters, db_path: Path | None, node: str) -> None:
        self.health = health
        self.local = local
        self.db_path = db_path
        self.node = node
        self.client = connect(health.url)
        self._total = self.client.register_script(TOTAL)
        self._levels_script = self.client.register_script(LEVELS)
        self._period_script = self.client.register_script(PERIOD)
        self._commit_script = self.client.register_script(COMMIT)
        self.own: dict[str, float] = {}  # this node's gauges and holds
        self._depth = 0
        self._ops: list[Op] = []
        self._token = ""
        self._unsent: dict[str, float] = {}  # own gauge changes in the current decision, not yet in Redis
        self._read: dict[tuple[str, str], Any] = {}  # what the current decision read (it holds the lock)
        self._pending: list[Op] = []  # adds made while Redis was down
        self.lost_pending = 0
        # Calendar amounts added outside a decision (spend no admission weighs: see period_add), one
        # entry per counter, sent by the link's publisher; counted in `local` at once.
        self._later = LaterAmounts()
        self.wake: Callable[[], None] | None = None  # the link's publisher, told when spend starts to wait

    # ------------------------------------------------------------------ decisions

    @contextmanager
    def atomic(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                ops, token = self._ops, self._token
                self._ops, self._token, self._unsent, self._read = [], "", {}, {}
                if ops or token:
                    self._commit(ops, token)

    def _fetch(self, kind: str, name: str, keys: list[str], *args: str | float) -> list[Any]:
        """A read script's answer. Inside a decision the first read takes the lock in the same round trip
        (no other node decides until this one has written), and what it read is kept for its later reads."""
        if (kind, name) in self._read:
            return self._read[(kind, name)]
        script = {"total": self._total, "levels": self._levels_script, "period": self._period_script}[kind]
        token = (self._token or secrets.token_hex(8)) if self._depth else ""
        deadline = 0.0
        while True:
            reply = script(keys=keys, args=[PREFIX, token, LOCK_MS, *args])
            if reply[0] != b"busy":
                break
            deadline = deadline or time.monotonic() + LOCK_WAIT_SECONDS
            if time.monotonic() > deadline:
                raise CountersUnavailable("another node held the shared counters' lock too long")
            time.sleep(0.0002)
        if self._depth:
            self._token = token
            self._read[(kind, name)] = reply[1:]
        return reply[1:]

    def _op(self, op: Op) -> None:
        if self._depth:
            self._ops.append(op)
        else:
            self._commit([op], "")

    def _commit(self, ops: list[Op], token: str) -> None:
        if self.health.up:
            try:
                lost = self._commit_script(args=[PREFIX, token, self.node, json.dumps(ops)])
                if lost:
                    log.warning("a limit decision outlived its Redis lock (%d ms): a limit may be passed", LOCK_MS)
                return
            except redis.RedisError as e:
                self.health.failed(e)
        kept = [op for op in ops if op[0] != "g"]  # own gauges are written whole when Redis returns
        room = PENDING_MAX - len(self._pending)
        self._pending.extend(kept[: max(0, room)])
        self.lost_pending += max(0, len(kept) - max(0, room))

    # ------------------------------------------------------------------ core.ports.Counters

    def moving_total(self, name: str, window_seconds: float, now: float) -> tuple[float, float | None]:
        if self.health.up:
            try:
                total, oldest = self._fetch("total", name, [f"{PREFIX}w:{name}"], now - window_seconds, now)
                return float(total), (float(oldest) if oldest else None)
            except redis.RedisError as e:
                self.health.failed(e)
        return self.local.moving_total(name, window_seconds, now)

    def moving_add(self, name: str, amount: float, now: float) -> object:
        local = self.local.moving_add(name, amount, now)
        self._op(["w", name, int(now), amount])
        return Entry(int(now), amount, local)

    def moving_adjust(self, name: str, entry: object, amount: float) -> None:
        if not isinstance(entry, Entry):
            return
        self.local.moving_adjust(name, entry.local, amount)
        delta, entry.amount = amount - entry.amount, amount
        if delta:
            self._op(["w", name, entry.second, delta])  # the second it was counted in, as MemoryCounters

    def period_total(self, name: str) -> float:
        if self.health.up:
            try:
                # Only a budget's admission reads a total, and a budget client's spend is settled inside a
                # decision, never later; but a request admitted before its client was given a budget settles
                # the later way, and the local view must not lose what waits: this node's unsent amounts count.
                total = float(self._fetch("period", name, [], name)[0]) + self._later.of(name)
                self.local.set_period(name, total)  # the local view keeps up with every node's spend
                return total
            except redis.RedisError as e:
                self.health.failed(e)
        return self.local.period_total(name)

    def period_add(self, name: str, amount: float) -> None:
        """Inside a decision, with its commit. Outside one, the Governor settles the spend of a client
        without a budget, a TPM or a parallel limit, which no admission weighs: it waits for the link's publisher,
        which sends what gathered within SPEND_SECONDS in one script (a script per amount on the event
        loop cost such a request ~0.7 ms of the proxy's CPU, bench/storage_cpu.py)."""
        self.local.period_add(name, amount)
        if self._depth:
            self._ops.append(["p", name, amount])
            return
        if self._later.add(name, amount) and self.wake is not None:
            self.wake()  # once per batch: the amounts of a burst of requests go together

    def take_later(self) -> list[Op]:
        """The calendar amounts added outside decisions since the last call, as COMMIT's ops."""
        return [["p", name, amount] for name, amount in self._later.take()]

    def give_back(self, ops: list[Op]) -> None:
        """Amounts a failed send did not deliver: sent with the next ones."""
        self._later.give_back([(name, amount) for _, name, amount in ops])

    def gauge(self, name: str) -> int:
        return int(self.level(name))

    def gauge_add(self, name: str, delta: int) -> None:
        self.raise_own(name, delta)

    # ------------------------------------------------------------------ gauges and holds: per node, summed

    def level(self, name: str) -> float:
        if self.health.up:
            try:
                flat = self._fetch("levels", "", [], "")
                levels = {flat[i].decode(): float(flat[i + 1]) for i in range(0, len(flat), 2)}
                return levels.get(name, 0.0) + self._unsent.get(name, 0.0)
            except redis.RedisError as e:
                self.health.failed(e)
        return self.own.get(name, 0.0)

    def raise_own(self, name: str, delta: float) -> None:
        before = self.own.get(name, 0.0)
        after = max(0.0, before + delta)
        if after > 1e-9:
            self.own[name] = after
        else:
            self.own.pop(name, None)
        if after != before:
            self._unsent[name] = self._unsent.get(name, 0.0) + after - before
            self._op(["g", name, after - before])

    # ------------------------------------------------------------------ Redis (re)joined

    def resync(self) -> None:
        """Redis answers (at start, or again): seed it if it is empty, replay what was counted meanwhile,
        write this node's gauges whole. Raises redis.RedisError if it stops answering again."""
        self.seed(self.client)
        pending, self._pending = self._pending, []
        try:
            for start in range(0, len(pending), 500):
                self._commit_script(args=[PREFIX, "", self.node, json.dumps(pending[start : start + 500])])
        except redis.RedisError:
            self._pending = pending + self._pending
            raise
        pipe = self.client.pipeline()
        pipe.delete(f"{PREFIX}g:{self.node}")
        if self.own:
            pipe.hset(f"{PREFIX}g:{self.node}", mapping=dict(self.own))
        pipe.sadd(PREFIX + "nodes", self.node)
        pipe.set(f"{PREFIX}node:{self.node}", "1", ex=NODE_TTL_SECONDS)
        pipe.execute()

    def seed(self, client: redis.Redis) -> None:
        """Seed an empty Redis from the database (the keeper does it off the loop before the loop resyncs)."""
        if not client.exists(PREFIX + "seeded"):
            client.eval(SEED, 0, PREFIX, json.dumps(self._seed_data()))

    def _seed_data(self) -> list[list[list[Any]]]:
        """The database's totals and last hour's windows (what the lease holder last copied there)."""
        if self.db_path is None:
            return [[], []]
        conn = db.connect(self.db_path, readonly=True)
        try:
            periods = [[name, value] for name, value in conn.execute("SELECT name, value FROM limit_counters")]
            windows = [
                [name, second, amount]
                for name, second, amount in conn.execute(
                    "SELECT name, second, amount FROM limit_windows WHERE second > ?",
                    (int(time.time()) - SEED_WINDOW_SECONDS,),
                )
            ]
        finally:
            conn.close()
        return [periods, windows]

    def start(self) -> None:
        """Nothing to run: the link's keeper thread flushes and heartbeats."""

    def stop(self) -> None:
        # The link stopped first and its publisher sent what waited; what is left (Redis down, its last
        # send failed, or no link ran) goes now: to Redis if it answers, else with the pending adds below.
        later = self.take_later()
        if later:
            self._commit(later, "")
        if not self.health.up and self._pending and self.db_path is not None:
            self._save_pending()
        with suppress(redis.RedisError):
            self.client.delete(f"{PREFIX}g:{self.node}", f"{PREFIX}node:{self.node}")
            self.client.srem(PREFIX + "nodes", self.node)
        self.client.close()

    def _save_pending(self) -> None:
        """Stopping while Redis is down: what this node spent meanwhile is added to the database's totals."""
        assert self.db_path is not None
        periods: dict[str, float] = {}
        for op in self._pending:
            if op[0] == "p":
                periods[op[1]] = periods.get(op[1], 0.0) + op[2]
        conn = db.connect(self.db_path)
        try:
            with conn:
                conn.executemany(
                    "INSERT INTO limit_counters (name, value, updated_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value,"
                    " updated_at = excluded.updated_at",
                    [(name, value, time.time()) for name, value in periods.items()],
                )
            self._pending = []  # saved: a second stop must not add them again
        except sqlite3.Error:
            log.exception("the spend counted while Redis was down could not be saved")
        finally:
            conn.close()


class RedisHolds(MutableMapping[str, float]):
    """core.limits.Governor.reserved across nodes: each node's holds in its own hash, summed when read."""

    PREFIX = "hold:"

    def __init__(self, counters: RedisCounters) -> None:
        self._counters = counters

    def __getitem__(self, name: str) -> float:
        value = self._counters.level(self.PREFIX + name)
        if value <= 1e-9:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: float) -> None:
        self._counters.raise_own(self.PREFIX + name, value - self._counters.level(self.PREFIX + name))

    def __delitem__(self, name: str) -> None:
        self._counters.raise_own(self.PREFIX + name, -self._counters.own.get(self.PREFIX + name, 0.0))

    def __iter__(self) -> Iterator[str]:
        return iter([name[len(self.PREFIX) :] for name in self._counters.own if name.startswith(self.PREFIX)])

    def __len__(self) -> int:
        return sum(1 for _ in self)


Learnt = list[KeyStateChange | tuple[int, Rested]]


class RedisLink:
    """This node's threads on Redis: what it learns goes out at once, what the others learnt comes in.

    - the publisher writes events to the stream (key states, rests, admin revisions), this
      node's requests in flight per key, and the spend its counters left for it (period_add);
    - the reader blocks on the stream (XREAD) and hands the others' events to the loop, and
      reads the others' requests in flight every READ_BLOCK_MS (least_used);
    - the keeper pings while Redis is down (and resyncs the counters when it answers), keeps
      this node's heartbeat, holds the flush lease and copies counters into the database.
    """

    STREAM = PREFIX + "events"

    def __init__(self, health: RedisHealth, counters: RedisCounters, db_path: Path | None, node: str) -> None:
        self.health = health
        self.counters = counters
        self.db_path = db_path
        self.node = node
        self.deliver: Callable[[Learnt], None] | None = None
        self.deliver_in_flight: Callable[[dict[int, int]], None] | None = None
        self.deliver_revision: Callable[[], None] | None = None
        self.loop: Any = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_id = f"{int((time.time() - HISTORY_SECONDS) * 1000)}-0"
        self._in_flight: dict[int, int] | None = None  # this node's, as last told (None: not least_used)
        self._in_flight_written: dict[int, int] | None = None
        self._in_flight_sent = 0.0
        self._elsewhere: dict[int, int] = {}
        self._unsent: list[tuple[str, Any]] = []  # events that could not be written yet
        self._resuming = threading.Event()
        self.on_received: Callable[[str, float], None] | None = None  # bench: (kind, seconds since published)
        counters.wake = self._spend_waits

    def _spend_waits(self) -> None:
        """The counters hold spend for the publisher (a marker on its queue, never published)."""
        self._queue.put(("spend", None))

    # ------------------------------------------------------------------ on the loop

    def publish_state(self, change: KeyStateChange) -> None:
        self._queue.put(("state", asdict(change)))

    def publish_rests(self, group_id: int, rests: list[Rested]) -> None:
        for rest in rests:
            self._queue.put(("rest", {"group_id": group_id, **asdict(rest)}))

    def publish_in_flight(self, counts: dict[int, int]) -> None:
        self._queue.put(("in_flight", counts))

    def publish_revision(self, name: str) -> None:
        self._queue.put(("revision", {"name": name}))

    # ------------------------------------------------------------------ threads

    def start(self) -> None:
        for target, name in ((self._publish, "publisher"), (self._read, "reader"), (self._keep, "keeper")):
            thread = threading.Thread(target=target, name=f"keyrotor-redis-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        for thread in self._threads:
            thread.join(5)
        self._threads = []
        if self.health.up and self.db_path is not None:
            with suppress(redis.RedisError, sqlite3.Error):
                client = connect(self.health.url)
                try:
                    if client.get(PREFIX + "flusher") == self.node.encode():
                        self._flush(client)
                        client.delete(PREFIX + "flusher")
                finally:
                    client.close()
        self.health.remove_status()

    def _publish(self) -> None:
        client = connect(self.health.url, THREAD_TIMEOUT_SECONDS)
        spend_due: float | None = None  # when the spend gathering since the first marker goes
        try:
            while not self._stop.is_set():
                items = take_all(self._queue, self._publish_wait(spend_due))
                if spend_due is None and any(kind == "spend" for kind, _ in items):
                    spend_due = time.monotonic() + SPEND_SECONDS
                events = self._unsent + [i for i in items if i[0] not in ("in_flight", "spend")]
                counts = [i[1] for i in items if i[0] == "in_flight"]
                if counts:
                    self._in_flight = counts[-1]
                # Only into a Redis this node is in step with: while it is down (or being seeded again) the
                # amounts wait, one per counter, and a seed from the database cannot overwrite them.
                spend: list[Op] = []
                if spend_due is not None and self.health.up and time.monotonic() >= spend_due:
                    spend, spend_due = self.counters.take_later(), None
                if not events and not spend and not (self._in_flight is not None and self._in_flight_due()):
                    continue
                try:
                    pipe = client.pipeline(transaction=False)
                    now = time.time()
                    for kind, data in events:
                        fields = {"node": self.node, "kind": kind, "data": json.dumps(data), "at": repr(now)}
                        pipe.xadd(self.STREAM, fields, maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
                    if spend:
                        self._send_spend(pipe, spend)
                    if self._in_flight is not None and self._in_flight_due():
                        key = f"{PREFIX}in_flight:{self.node}"
                        pipe.delete(key)
                        if self._in_flight:
                            pipe.hset(key, mapping={str(k): v for k, v in self._in_flight.items()})
                        pipe.expire(key, 5)
                        pipe.sadd(PREFIX + "nodes", self.node)
                    writes_in_flight = self._in_flight is not None and self._in_flight_due()
                    pipe.execute()
                    self._unsent = []
                    if writes_in_flight:
                        self._in_flight_written, self._in_flight_sent = self._in_flight, time.monotonic()
                except redis.RedisError as e:
                    self.health.failed(e)
                    self._unsent = events[-STREAM_MAXLEN:]
                    if spend:
                        self.counters.give_back(spend)
                        spend_due = time.monotonic()  # as soon as Redis answers again (and this node resynced)
                    self._stop.wait(RETRY_SECONDS)
            self._send_last_spend(client)
        finally:
            client.close()

    def _publish_wait(self, spend_due: float | None) -> float:
        """How long the publisher waits for the next item: not at all with events to resend; until the
        spend is due; else (and while Redis is down, when spend cannot go) half a second."""
        if self._unsent:
            return 0.0
        if spend_due is None or not self.health.up:
            return 0.5
        return max(0.0, spend_due - time.monotonic())

    def _send_spend(self, target: redis.Redis | redis.client.Pipeline, ops: list[Op]) -> None:
        # EVAL, not the registered script: a pipeline checks its scripts exist (a round trip) each time.
        target.eval(COMMIT, 0, PREFIX, "", self.node, json.dumps(ops))

    def _send_last_spend(self, client: redis.Redis) -> None:
        """Stopping: what waits goes now, before the lease holder's last copy into the database; if Redis
        does not take it, RedisCounters.stop saves it in the database with the adds made while it was down."""
        if not self.health.up:
            return
        spend = self.counters.take_later()
        if not spend:
            return
        try:
            self._send_spend(client, spend)
        except redis.RedisError as e:
            self.counters.give_back(spend)
            self.health.failed(e)

    def _in_flight_due(self) -> bool:
        """Changed, or not written for a second (its Redis hash expires unless rewritten)."""
        return self._in_flight != self._in_flight_written or time.monotonic() - self._in_flight_sent >= 1.0

    def _read(self) -> None:
        client = connect(self.health.url, THREAD_TIMEOUT_SECONDS + IDLE_BLOCK_MS / 1000)
        try:
            while not self._stop.is_set():
                if not self.health.up:
                    self._stop.wait(RETRY_SECONDS / 5)
                    continue
                least_used = self.deliver_in_flight is not None and self._in_flight is not None
                try:
                    block = READ_BLOCK_MS if least_used else IDLE_BLOCK_MS
                    found: Any = client.xread({self.STREAM: self._last_id}, count=1000, block=block)
                    if found:
                        self._received(found[0][1])
                    if least_used:
                        self._read_in_flight(client)
                except redis.RedisError as e:
                    self.health.failed(e)
        finally:
            client.close()

    def _received(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        self._last_id = entries[-1][0].decode()
        theirs: Learnt = []
        revision = False
        for _, fields in entries:
            if fields.get(b"node", b"").decode() == self.node:
                continue
            kind = fields[b"kind"].decode()
            if self.on_received is not None:
                self.on_received(kind, time.time() - float(fields.get(b"at", b"0")))
            if kind == "revision":
                revision = True
            elif kind in ("state", "rest"):
                theirs.append(learnt(kind, json.loads(fields[b"data"])))
        if self.loop is None:
            return
        with suppress(RuntimeError):  # the loop closed: the node is stopping
            if theirs and self.deliver is not None:
                self.loop.call_soon_threadsafe(self.deliver, theirs)
            if revision and self.deliver_revision is not None:
                self.loop.call_soon_threadsafe(self.deliver_revision)

    def _read_in_flight(self, client: redis.Redis) -> None:
        nodes = [n.decode() for n in client.smembers(PREFIX + "nodes") if n.decode() != self.node]  # type: ignore[union-attr]
        pipe = client.pipeline(transaction=False)
        for node in nodes:
            pipe.hgetall(f"{PREFIX}in_flight:{node}")
        elsewhere: dict[int, int] = {}
        for counts in pipe.execute():
            for key_id, value in counts.items():
                elsewhere[int(key_id)] = elsewhere.get(int(key_id), 0) + int(value)
        if elsewhere != self._elsewhere and self.loop is not None and self.deliver_in_flight is not None:
            self._elsewhere = elsewhere
            with suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.deliver_in_flight, elsewhere)

    def _keep(self) -> None:
        client = connect(self.health.url, THREAD_TIMEOUT_SECONDS)
        next_beat = next_flush = next_status = 0.0
        next_purge = time.monotonic() + sqlite_counters.PURGE_SECONDS
        try:
            wait = 0.1
            while not self._stop.wait(wait):
                now = time.monotonic()
                wait = 0.1  # while Redis is down (it is tried every RETRY_SECONDS); else until the next task
                try:
                    if not self.health.up:
                        client.ping()
                        self._resume()
                        self._stop.wait(RETRY_SECONDS - 0.1)
                        continue
                    if now >= next_beat:
                        next_beat = now + HEARTBEAT_SECONDS
                        self._heartbeat(client)
                    if now >= next_flush and self.db_path is not None:
                        next_flush = now + FLUSH_SECONDS
                        if self._hold_lease(client):
                            self._flush(client)
                            if now >= next_purge:  # what a single proxy's counters thread does (storage/counters.py)
                                next_purge = now + sqlite_counters.PURGE_SECONDS
                                self._purge(client)
                except redis.RedisError as e:
                    self.health.failed(e)
                    self._stop.wait(RETRY_SECONDS)
                except sqlite3.Error:
                    log.exception("copying the shared counters into the database failed; retrying")
                if now >= next_status:
                    next_status = now + STATUS_SECONDS
                    self.health.write_status()
                if self.health.up:
                    wait = min(RETRY_SECONDS, max(0.05, min(next_beat, next_flush, next_status) - time.monotonic()))
        finally:
            client.close()

    def _resume(self) -> None:
        """Redis answers again: the counters resync on the loop (where they are used), then the node rejoins."""
        if self._resuming.is_set():
            return
        self._resuming.set()
        try:  # the heavy part, off the loop: an empty Redis (restarted without persistence) is seeded first
            seeder = connect(self.health.url, SEED_TIMEOUT_SECONDS)
            try:
                self.counters.seed(seeder)
            finally:
                seeder.close()
        except redis.RedisError as e:
            self._resuming.clear()
            self.health.failed(e)
            return
        except sqlite3.Error as e:
            self._resuming.clear()
            self._cannot_seed(e)
            return
        if self.loop is None:
            self._resync()
            return
        with suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._resync)

    def _resync(self) -> None:
        try:
            self.counters.resync()
            self.health.recovered()
            self._spend_waits()  # what waited during the outage may go now
        except redis.RedisError as e:
            self.health.failed(e)
        except sqlite3.Error as e:  # emptied again between the keeper's seed and this resync
            self._cannot_seed(e)
        finally:
            self._resuming.clear()

    def _cannot_seed(self, error: sqlite3.Error) -> None:
        """Redis answers but is empty, and the database's totals cannot be read (PostgreSQL away): seeding it
        from nothing would forget what clients spent, so for this node Redis is as good as unreachable. It
        serves on its local view (said once per outage, with this reason) and tries again every RETRY_SECONDS."""
        self.health.failed(RuntimeError(f"{SEED_REFUSED}: {error}"))

    def _heartbeat(self, client: redis.Redis) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.set(f"{PREFIX}node:{self.node}", "1", ex=NODE_TTL_SECONDS)
        pipe.sadd(PREFIX + "nodes", self.node)
        pipe.smembers(PREFIX + "nodes")
        pipe.exists(PREFIX + "seeded")
        _, _, members, seeded = pipe.execute()
        if not seeded:  # emptied under the nodes (FLUSHALL, a restart between two calls): seed it again
            self._resume()
        others = [m.decode() for m in members if m.decode() != self.node]
        if not others:
            return
        alive = client.pipeline(transaction=False)
        for node in others:
            alive.exists(f"{PREFIX}node:{node}")
        for node, exists in zip(others, alive.execute(), strict=True):
            if not exists:  # a node gone without stopping: its requests in flight and holds ended with it
                client.delete(f"{PREFIX}g:{node}", f"{PREFIX}in_flight:{node}")
                client.srem(PREFIX + "nodes", node)

    def _hold_lease(self, client: redis.Redis) -> bool:
        if client.set(PREFIX + "flusher", self.node, nx=True, px=LEASE_MS):
            return True
        if client.get(PREFIX + "flusher") == self.node.encode():
            client.pexpire(PREFIX + "flusher", LEASE_MS)
            return True
        return False

    def _purge(self, client: redis.Redis) -> None:
        """Old counters go, from the database (as one proxy's counters thread does) and from Redis."""
        assert self.db_path is not None
        conn = db.connect(self.db_path)
        try:
            sqlite_counters.purge(conn, time.time())
        finally:
            conn.close()
        old = [name for name in client.hkeys(PREFIX + "p") if period_ended(name.decode(), time.time())]  # type: ignore[union-attr]
        if old:
            client.hdel(PREFIX + "p", *old)

    def _flush(self, client: redis.Redis) -> None:
        """Copy what changed in Redis into the database (limit_counters, limit_windows); given back on failure."""
        assert self.db_path is not None
        taken: Any = client.eval(TAKE, 0, PREFIX)
        periods_flat, windows_flat = taken
        periods = [(periods_flat[i].decode(), float(periods_flat[i + 1])) for i in range(0, len(periods_flat), 2)]
        windows = []
        for i in range(0, len(windows_flat), 2):
            name, _, second = windows_flat[i].decode().rpartition("\n")
            windows.append((name, int(second), float(windows_flat[i + 1])))
        if not periods and not windows:
            return
        try:
            conn = db.connect(self.db_path)
            try:
                sqlite_counters.save(conn, periods, windows, time.time())
            finally:
                conn.close()
        except sqlite3.Error:
            pipe = client.pipeline()
            for name, _ in periods:
                pipe.sadd(PREFIX + "pd", name)
            for name, second, amount in windows:
                pipe.hincrbyfloat(PREFIX + "wd", f"{name}\n{second}", amount)
            pipe.execute()
            raise


def period_ended(name: str, now: float) -> bool:
    """Whether a calendar counter (core.limits.spend_name: spend:5:usd:day:2026-12-01) ended long enough
    ago to be dropped, as the database drops totals not updated for PERIOD_KEEP_SECONDS."""
    period = name.rsplit(":", 1)[-1]
    try:
        start = datetime.strptime(period if len(period) == 10 else period + "-01", "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return False
    return now - start.timestamp() > sqlite_counters.PERIOD_KEEP_SECONDS + 31 * 86400


class RedisStates:
    """core.ports.PoolStateSink and RestSink across nodes: key states go to the database (the writer,
    as with one node) and, like rests, at once to the other nodes."""

    def __init__(self, writer: PoolStateSink, link: RedisLink) -> None:
        self.writer = writer
        self.link = link

    def save_state(self, change: KeyStateChange) -> None:
        self.writer.save_state(change)
        self.link.publish_state(change)

    def save_rests(self, group_id: int, rests: list[Rested]) -> None:
        self.link.publish_rests(group_id, rests)


def node_name() -> str:
    """This process among the nodes: host, pid and a random part (a restarted process is a new node)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class RevisionPublisher:
    """Tells every node of an admin change (a revision bump) at once, from the process that made it (CLI, UI).

    Called where the revision is bumped, inside its transaction: nodes that hear it read the
    revisions again for a short while until the change is committed (core/revisions.py)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = connect(url)
        self._failed_at = 0.0

    def __call__(self, name: str) -> None:
        if time.monotonic() - self._failed_at < RETRY_SECONDS * 10:
            return  # Redis was down a moment ago: nodes find the change by their poll
        fields = {"node": "admin", "kind": "revision", "data": json.dumps({"name": name}), "at": repr(time.time())}
        try:
            self.client.xadd(RedisLink.STREAM, fields, maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
        except redis.RedisError as e:
            self._failed_at = time.monotonic()
            log.warning(
                "could not tell the nodes of an admin change through Redis at %s (%s): they see it within their"
                " poll (0.5 s)",
                masked_url(self.url),
                _reason(e),
            )


def open_redis(url: str, db_path: Path, local: MemoryCounters) -> tuple[RedisHealth, RedisCounters, RedisLink]:
    """This node's Redis parts; Redis may be down (the node starts on its local view, and says so)."""
    node = node_name()
    health = RedisHealth(url, db_path)
    counters = RedisCounters(health, local, db_path, node)
    link = RedisLink(health, counters, db_path, node)
    try:
        seeder = connect(url, SEED_TIMEOUT_SECONDS)
        try:
            seeder.ping()
            counters.seed(seeder)  # an empty Redis: the database's totals, however long that takes
        finally:
            seeder.close()
        counters.resync()
        health.recovered()
        log.info("sharing limits, key states and admin changes through Redis at %s", health.shown)
    except redis.RedisError as e:
        health.failed(e)
    return health, counters, link


_announcing: set[str] = set()


def announce_revisions(url: str) -> None:
    """Make this process tell every node of the admin changes it makes (once per process)."""
    if url and url not in _announcing:
        _announcing.add(url)
        db.revision_announcers.append(RevisionPublisher(url))


@dataclass(frozen=True)
class RedisView:
    """What the UI shows of Redis: whether it answers the UI, and what the nodes report."""

    up: bool
    error: str | None
    errors: int  # failed Redis calls the running nodes counted
    nodes_down: int  # nodes that report Redis unreachable
    down_since: float | None


def view(url: str, db_path: str | Path, now: float) -> RedisView | None:
    """Redis as the UI sees it (a ping of its own, bounded by TIMEOUT_SECONDS) and as the nodes beside
    this database report it; None without [redis] url."""
    if not url:
        return None
    error = None
    client = connect(url)
    try:
        client.ping()
    except redis.RedisError as e:
        error = _reason(e)
    finally:
        client.close()
    statuses = read_statuses(db_path, now)
    down = [s for s in statuses if not s.up]
    return RedisView(
        up=error is None and not down,
        error=error or next((s.error for s in down if s.error), None),
        errors=sum(s.errors for s in statuses),
        nodes_down=len(down),
        down_since=min((s.down_since for s in down if s.down_since), default=None),
    )
