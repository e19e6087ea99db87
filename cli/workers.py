"""`run.py proxy --workers N`: N proxy processes on one port, and the supervisor that keeps them running.

Each worker is `run.py proxy --worker-index I`: a whole mitmdump with keyrotor's addons,
listening on the same port with SO_REUSEPORT (addons/listener.py), so the kernel spreads
new connections over them. What they share goes through SQLite (storage/workers.py,
wired in addons/runtime.py). This process only starts them, restarts one that dies (with
backoff; the others keep serving), and on SIGTERM or Ctrl-C passes the signal on and waits
for every worker to drain and flush its captures. See docs/workers.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time

from config import ROOT, ConfigError, Settings
from storage import workers as shared

log = logging.getLogger(__name__)

# How long the supervisor waits for its workers beyond the proxy's grace for requests in
# flight: each worker's writer flushes what it holds (cli/serve.py's margin, for the same reason).
STOP_MARGIN_SECONDS = 15
POLL_SECONDS = 0.1
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # before restarting a worker that died, by deaths in a row
STEADY_SECONDS = 30.0  # a worker that ran this long before dying starts the backoff over
GIVE_UP_AFTER = 5  # deaths in a row of a worker that never got steady: something is wrong with all of them


def worker_argv(args: argparse.Namespace, index: int) -> list[str]:
    """The command line of worker `index`: the supervisor's own, as one worker of the same number."""
    given = list(args.argv)
    if "proxy" in given:
        given.remove("proxy")  # the command; what follows it is passed on as given
    return [sys.executable, str(ROOT / "run.py"), "proxy", *given, "--worker-index", str(index)]


def supervise(args: argparse.Namespace, settings: Settings) -> int:
    """Run settings' proxy.workers workers until told to stop; 0 when stopped by a signal."""
    count = settings["proxy.workers"]
    if args.web:
        raise ConfigError(
            "--web runs mitmweb, which shows the flows of its own process only: use it with proxy.workers = 1"
            " (every worker's flows are on the UI's flows page)."
        )
    if count > 1 and settings["storage.url"] and not settings["redis.url"]:
        raise ConfigError(shared.NEED_REDIS)  # at once: each worker would refuse, and be restarted, until given up
    shared.prepare(settings.storage_path, count)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    children: dict[int, subprocess.Popen] = {}
    started: dict[int, float] = {}
    deaths: dict[int, int] = dict.fromkeys(range(count), 0)
    restart_at: dict[int, float] = {}
    stopping = False

    def start(index: int) -> None:
        children[index] = subprocess.Popen(worker_argv(args, index))
        started[index] = time.monotonic()

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(count):
        start(index)
    log.info("keyrotor: %d proxy workers on port %s", count, settings["proxy.port"])
    failed = False
    while not stopping:
        time.sleep(POLL_SECONDS)
        now = time.monotonic()
        for index, child in list(children.items()):
            code = child.poll()
            if code is None or stopping:
                continue
            del children[index]
            steady = now - started[index] >= STEADY_SECONDS
            deaths[index] = 1 if steady else deaths[index] + 1
            if deaths[index] > GIVE_UP_AFTER:
                log.error("keyrotor: proxy worker %d keeps dying (exit %s); stopping every worker", index, code)
                failed = stopping = True
                break
            wait = BACKOFF_SECONDS[min(deaths[index], len(BACKOFF_SECONDS)) - 1]
            log.warning("keyrotor: proxy worker %d ended (exit %s); restarting it in %g s", index, code, wait)
            restart_at[index] = now + wait
        for index, at in list(restart_at.items()):
            if not stopping and now >= at:
                del restart_at[index]
                start(index)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)  # a worker already draining after Ctrl-C ignores it
    deadline = time.monotonic() + settings["proxy.stop_grace_seconds"] + STOP_MARGIN_SECONDS
    codes = []
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        codes.append(child.returncode)
    if failed:
        return 1
    return next((c for c in codes if c not in (0, -signal.SIGTERM)), 0)
