"""Real PostgreSQL and Redis servers for the tests, each on a free loopback port in a temporary directory.

Debian's packages (installed by scripts/install_services.sh from ./test.sh) provide the binaries;
nothing here uses a system-wide server. PostgreSQL refuses to run as root, which is how CI runs:
then the cluster belongs to the `postgres` user the package creates and its commands run as that
user (runuser). Without the binaries the tests skip; under CI=true they fail instead, because there
a missing server means a broken install step.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STARTUP_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(reason: str) -> None:
    """Skip on a developer's machine; fail in CI, where a missing server means a broken install step."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: PostgreSQL and Redis tests must run)", pytrace=False)
    pytest.skip(reason)


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None and what == "redis":
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not start on port {port}: {text}")


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@dataclass
class PostgresServer:
    """One cluster; `database()` makes a fresh empty database for a test and returns its URL."""

    bindir: Path
    datadir: Path
    port: int
    as_user: list[str]
    log: Path
    made: int = 0

    @property
    def admin_url(self) -> str:
        return f"postgresql://keyrotor:keyrotor@127.0.0.1:{self.port}/postgres"

    def url(self, name: str) -> str:
        return f"postgresql://keyrotor:keyrotor@127.0.0.1:{self.port}/{name}"

    def database(self, prefix: str = "t") -> str:
        self.made += 1
        name = f"{prefix}_{os.getpid()}_{self.made}"
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def sql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]  # test-made statements only

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.log), "-w", *args],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-o", options, "start")

    def stop(self) -> None:
        """Fast shutdown: connections are cut, as when the server goes away under keyrotor."""
        self._ctl("-m", "fast", "stop")

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_postgres() -> PostgresServer:
    bindir = postgres_bin()
    if bindir is None:
        missing("PostgreSQL is not installed (Debian's postgresql package; ./test.sh installs it)")
        raise AssertionError("unreachable")
    top = Path(tempfile.mkdtemp(prefix="keyrotor-pg-"))
    datadir = top / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        # initdb and postgres refuse root: the cluster is the package's postgres user's.
        top.chmod(0o755)
        datadir.mkdir(mode=0o700)
        shutil.chown(datadir, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    pwfile = top / "pw"
    pwfile.write_text("keyrotor\n")
    if as_user:
        shutil.chown(pwfile, "postgres", "postgres")
    subprocess.run(
        [
            *as_user,
            str(bindir / "initdb"),
            "-D",
            str(datadir),
            "-U",
            "keyrotor",
            f"--pwfile={pwfile}",
            "-A",
            "scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    log = datadir / "server.log"
    server = PostgresServer(bindir=bindir, datadir=datadir, port=free_port(), as_user=as_user, log=log)
    server.start()
    return server


@dataclass
class RedisServer:
    """One redis-server with no persistence; restart() keeps its port (a Redis that went away and came back)."""

    dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = self.dir / "redis.log"
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(log),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process, "redis", log)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_redis() -> RedisServer:
    if shutil.which("redis-server") is None:
        missing("Redis is not installed (Debian's redis-server package; ./test.sh installs it)")
    server = RedisServer(dir=Path(tempfile.mkdtemp(prefix="keyrotor-redis-")), port=free_port())
    server.start()
    return server
