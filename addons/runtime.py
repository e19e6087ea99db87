"""The proxy's composition root: what the addons share, built once per process.

The addons receive what they use in their constructors (the state snapshot, the writer as
a sink, the Governor, the admin key) and never open storage themselves: this module and
the -s entry (addons/keyrotor.py) are the only addons that import storage/. Another
backend (PostgreSQL, Redis) or another process model is a change to this module only.

Storage opens when the `keyrotor_storage` option is set (the KeyRotor addon declares it
and makes the database first); the writer, the counters and the one revision watcher
start in `running` and stop in `done`. The Runtime is registered last: its `done` runs
after every other addon's, so what they queue while stopping is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from core import ports
from core.limits import Governor
from core.state import ProxyState
from storage import db, redis_shared, secrets, workers, writer
from storage.client_keys import SqliteClientStore
from storage.counters import MemoryCounters, SqliteCounters
from storage.objects import SqliteObjectOwners
from storage.routes import SqliteRouteStore
from storage.upstream_keys import SqliteKeyStore

log = logging.getLogger(__name__)


class Sink(
    ports.RecordSink, ports.PoolStateSink, ports.OwnershipSink, ports.ModelListSink, ports.RefusalSink, Protocol
):
    """The one writer: every write the proxy makes goes through it, off the event loop."""


class Backend(Protocol):
    """Where the ports come from: storage/'s SQLite here, in-memory fakes in tests (tests/fakes.py)."""

    @property
    def writer(self) -> Sink:
        """Exists before the database is known: the addons get it in their constructors."""
        ...

    @property
    def admin_keys(self) -> ports.AdminKeys: ...

    @property
    def counters(self) -> ports.Counters | None:
        """Set by open(): the counts and spend as the last run left them."""
        ...

    @property
    def revisions(self) -> ports.Revisions | None:
        """Set by open(): the watcher's poll reads it on the loop."""
        ...

    def open(self, path: Path) -> None: ...

    def stores(self) -> AbstractContextManager[ports.StateStores]:
        """The stores for one read of the state (core/state.py), on one connection."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None:
        """Stop writing, after writing what is queued."""
        ...


class Runtime:
    """Builds what the addons use, once; opens storage, starts and stops it with the proxy."""

    def __init__(self, backend: Backend | None = None, storage_url: str = "", redis_url: str = "") -> None:
        if storage_url:
            db.use_postgres(storage_url)  # storage.url: every connection of this process goes there
        if backend is None:
            backend = PostgresBackend(redis_url) if db.postgres_url() else SqliteBackend(redis_url)
        self.backend: Backend = backend
        self.writer = self.backend.writer
        self.admin_keys = self.backend.admin_keys
        self.state = ProxyState(states=self.writer)  # routes, keys, clients, owners: one snapshot
        # Client limits: Access admits requests, Spend settles them; its counters come with the database.
        self.governor = Governor(counters=None)  # type: ignore[arg-type]
        self.path: Path | None = None
        self._watcher: asyncio.Task | None = None
        self._in_flight: asyncio.Task | None = None  # with workers: tells the others this one's requests in flight
        self._nudge = asyncio.Event()  # set when Redis announces an admin change: reload now, not at the next poll

    def load(self, loader: Loader) -> None:
        # Set by the supervisor of `run.py proxy --workers N` (cli/workers.py) on each worker it starts.
        loader.add_option("proxy_workers", int, 1, "How many proxy workers share the proxy port (docs/workers.md).")
        loader.add_option("proxy_worker_index", int, 0, "Which of the proxy workers this process is, from 0.")

    def configure(self, updated: set[str]) -> None:
        if "keyrotor_storage" in updated:
            postgres_alone = isinstance(self.backend, PostgresBackend) and not self.backend.redis_url
            if ctx.options.proxy_workers > 1 and postgres_alone:
                raise exceptions.OptionsError(workers.NEED_REDIS)  # the supervisor refuses first (cli/workers.py)
            if ctx.options.proxy_workers > 1 and isinstance(self.backend, SqliteBackend):
                self.backend.worker = ctx.options.proxy_worker_index  # what workers share: storage/workers.py
            try:
                self.open(Path(ctx.options.keyrotor_storage))
            except workers.NotPrepared as e:
                raise exceptions.OptionsError(str(e)) from None

    def running(self) -> None:
        self.start()
        if ctx.options.proxy_workers > 1:
            # A worker starts with server=false (cli/serve.py): mitmproxy would listen before this
            # script is loaded, without addons/listener.py's SO_REUSEPORT. It listens now, state loaded.
            ctx.options.update(server=True)

    def done(self) -> None:
        self.stop()

    def open(self, path: Path) -> None:
        """Use the database at `path` (already made by the KeyRotor addon): the state is read from it now."""
        self.path = path
        self.backend.open(path)
        if self.backend.counters is not None:
            self.governor.counters = self.backend.counters
        link = self.backend.link if isinstance(self.backend, SqliteBackend) else None
        counters = self.backend.counters
        shared: tuple[redis_shared.RedisStates | workers.SharedStates, MutableMapping[str, float]] | None = None
        if isinstance(link, redis_shared.RedisLink) and isinstance(counters, redis_shared.RedisCounters):
            # Nodes (and workers) share through Redis, which also announces admin changes.
            shared = redis_shared.RedisStates(self.writer, link), redis_shared.RedisHolds(counters)
            link.deliver_revision = lambda: self._nudge.set()
        elif isinstance(link, workers.WorkerLink) and isinstance(counters, workers.SharedCounters):
            shared = workers.SharedStates(self.writer, link), workers.SharedHolds(counters)
        if link is not None and shared is not None:
            # Key states and rests also go to the other nodes or workers, and they are told theirs.
            states, self.governor.reserved = shared
            self.state.states, self.state.rests = states, states
            link.deliver = lambda learnt: self.state.absorb(learnt, time.time())
            link.deliver_in_flight = self.state.absorb_in_flight
        self.state.attach(self.backend.stores)

    def start(self) -> None:
        if isinstance(self.backend, SqliteBackend) and self.backend.link is not None:
            self.backend.link.loop = asyncio.get_running_loop()
        self.backend.start()
        if self.backend.revisions is not None:
            redis = isinstance(self.backend, SqliteBackend) and isinstance(self.backend.link, redis_shared.RedisLink)
            nudge = self._nudge if redis else None  # Redis announces admin changes; the poll stays the fallback
            self._watcher = asyncio.create_task(self.state.watch(self.backend.revisions, nudge))
        if isinstance(self.backend, SqliteBackend) and self.backend.link is not None:
            self._in_flight = asyncio.create_task(self._tell_in_flight(self.backend.link))

    async def _tell_in_flight(self, link: workers.WorkerLink | redis_shared.RedisLink) -> None:
        """With workers and least_used: this worker's requests in flight per key, for the others to count.

        Other strategies look again every second only: a wake-up every POLL_SECONDS cost an idle
        worker a core's 0.5 % (bench/workers.py, docs/workers.md)."""
        while True:
            least_used = self.state.settings.strategy == "least_used"
            await asyncio.sleep(workers.POLL_SECONDS if least_used else workers.STRATEGY_CHECK_SECONDS)
            if least_used:
                link.publish_in_flight(self.state.in_flight())

    def stop(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            self._watcher = None
        if self._in_flight:
            self._in_flight.cancel()
            self._in_flight = None
        self.backend.stop()


@dataclass
class Stores:
    """core.ports.StateStores: storage's stores over one connection."""

    keys: ports.KeyStore
    routes: ports.RouteStore
    clients: ports.ClientStore
    owners: ports.ObjectOwners
    revisions: ports.Revisions


class SqliteAdminKeys:
    """core.ports.AdminKeys: the admin key's record beside the database (storage/secrets.py)."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def version(self) -> object:
        return secrets.admin_key_version(self.path) if self.path is not None else None

    def mitmweb_password(self) -> str:
        if self.path is None:
            raise LookupError("no database is open")
        return secrets.mitmweb_password(self.path)

    def pass_key(self) -> bytes | None:
        return secrets.pass_key(self.path) if self.path is not None else None


class SqliteBackend:
    """storage/'s implementations of core's ports, for one SQLite database; with `redis_url`, what nodes
    share (client limits, key states, rests, admin changes) goes through Redis (storage/redis_shared.py)."""

    def __init__(self, redis_url: str = "") -> None:
        self.writer = writer.Writer()  # the one write connection; its path is set by open()
        self.admin_keys = SqliteAdminKeys()
        self.counters: SqliteCounters | workers.SharedCounters | redis_shared.RedisCounters | None = None
        self.revisions: db.RevisionReader | db.PolledRevisions | None = None
        self.path: Path | None = None
        self.worker: int | None = None  # with workers, this one's index: what they share is storage/workers.py's
        self.link: workers.WorkerLink | redis_shared.RedisLink | None = None
        self.redis_url = redis_url
        self._running = False

    def open(self, path: Path) -> None:
        self._close()
        self.path = self.admin_keys.path = path
        if self.redis_url:
            # Workers too are nodes then: Redis is what they share (docs/redis.md), not the .workers file.
            local = MemoryCounters()  # this node's view while Redis is away, from the database's totals
            conn = db.connect(path, readonly=True)
            try:
                local.restore(conn, time.time())
            finally:
                conn.close()
            _, self.counters, self.link = redis_shared.open_redis(self.redis_url, path, local)
            redis_shared.announce_revisions(self.redis_url)
        elif self.worker is None:
            self.counters = SqliteCounters(path)
        else:
            self.counters = workers.SharedCounters(workers.path_of(path), self.worker)
            self.link = workers.WorkerLink(workers.path_of(path), path, self.worker)
            self.link.counters = self.counters
        self.revisions = db.RevisionReader(path)
        if not self.writer.started:
            self.writer.path = path
            self.writer.worker = self.worker
        elif self.writer.path != path:
            log.warning("flows are still written to %s until the proxy restarts", self.writer.path)
        if self._running:
            self.counters.start()

    @contextmanager
    def stores(self) -> Iterator[ports.StateStores]:
        assert self.path is not None, "open() comes first"
        cipher = secrets.key_cipher(self.path)
        conn = db.connect(self.path)
        try:
            yield Stores(
                keys=SqliteKeyStore(conn, cipher),
                routes=SqliteRouteStore(conn),
                clients=SqliteClientStore(conn),
                owners=SqliteObjectOwners(conn),
                revisions=db.ConnectionRevisions(conn),
            )
        finally:
            conn.close()

    def start(self) -> None:
        self._running = True
        if not self.writer.started:
            self.writer.start()
        if self.counters is not None:
            self.counters.start()
        if self.link is not None:
            self.link.start()

    def stop(self) -> None:
        self._running = False
        self._close()
        if self.writer.started:
            self.writer.stop()  # flushes every queued row

    def _close(self) -> None:
        if self.revisions is not None:
            self.revisions.close()
            self.revisions = None
        if self.link is not None:
            self.link.stop()  # sends what it holds; worker 0 copies the counters into the database
            self.link = None
        if self.counters is not None:
            self.counters.stop()  # writes what changed since the last flush
            self.counters = None


class PostgresBackend(SqliteBackend):
    """The same stores on PostgreSQL (storage.url; storage/pg.py): every connection this process
    opens goes there (storage/db.py use_postgres). The revisions are polled by a thread of their
    own, as a network read must never hold up the event loop; the writer keeps captures in
    memory while the server is away (capture.backlog_mb)."""

    def open(self, path: Path) -> None:
        super().open(path)
        if self.revisions is not None:
            self.revisions.close()
        self.revisions = db.PolledRevisions(path)
