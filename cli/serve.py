"""`serve`, `proxy` and `ui`: start the proxy (cli/proxy_master.py, or mitmweb with --web) and the monitor UI."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import subprocess
import sys
import time

from cli import console, ports
from config import ADDON_SETTINGS, ROOT, Settings, settings_in
from storage import secrets

SCRIPT = ROOT / "addons" / "keyrotor.py"
# How long `serve` waits for its children beyond the proxy's own grace for requests in
# flight: the writer's flush (up to writer.STOP_RETRY_SECONDS when the database refuses writes).
STOP_MARGIN_SECONDS = 15


def proxy_argv(settings: Settings, web: bool) -> list[str]:
    # mitmweb loads keyrotor's concerns as a script; run.py's own master (cli/proxy_master.py) imports them.
    argv = [
        *(["-s", str(SCRIPT)] if web else []),
        "--mode",
        f"reverse:{settings['proxy.upstream']}",
        "--listen-host",
        settings["proxy.host"],
        "--listen-port",
        str(settings["proxy.port"]),
        "--set",
        f"keyrotor_storage={settings.storage_path}",
        # Also set by the addon when it starts running, but the listener opens before that:
        # on the command line it holds for the very first connection too.
        "--set",
        "connection_strategy=lazy",
    ]
    for setting in ADDON_SETTINGS:  # each is the addon option <section>_<key>
        argv += ["--set", f"{setting.section}_{setting.key}={settings[setting.name]}"]
    if web:
        argv += [
            "--set",
            f"web_host={settings['ui.host']}",
            "--set",
            f"web_port={settings['proxy.web_port']}",
            "--set",
            f"web_password={secrets.mitmweb_password(settings.storage_path)}",
            "--set",
            "web_open_browser=false",
        ]
    return argv


def worker_options(settings: Settings, index: int) -> list[str]:
    """What makes a mitmdump one of proxy.workers workers (addons/runtime.py reads these options)."""
    return [
        "--set",
        f"proxy_workers={settings['proxy.workers']}",
        "--set",
        f"proxy_worker_index={index}",
        # Not listening until the script is loaded: the Runtime opens the shared listener then.
        "--set",
        "server=false",
    ]


def proxy(args: argparse.Namespace, settings: Settings) -> int:
    if args.worker_index is None and settings["proxy.workers"] > 1:
        from cli import workers

        ports.check(settings, ports.PROXY)  # before any worker starts: they share it (SO_REUSEPORT)
        return workers.supervise(args, settings)
    if args.worker_index is None:  # a worker's siblings hold the port already
        ports.check(settings, ports.PROXY, *([ports.MITMWEB] if args.web else []))
    verbose = getattr(args, "verbose", False)
    console.quiet(verbose)
    # mitmproxy logs a listener that failed to bind, with its own advice (`--mode …@PORT`): ours instead.
    logging.getLogger("mitmproxy.addons.proxyserver").addFilter(ports.ListenFailure(ports.PROXY, settings))
    argv = proxy_argv(settings, args.web)
    # addons/keyrotor.py reads [otel] as it is imported, from config.toml and KEYROTOR_* variables (its
    # addon is in the chain only when otel.endpoint is set): --config and --set reach it this way.
    os.environ.update({s.env_var: str(settings[s.name]) for s in settings_in("otel")})
    if args.worker_index is not None:
        argv += worker_options(settings, args.worker_index)
    try:
        if args.web:
            from mitmproxy.tools import main

            main.mitmweb(argv + console.proxy_argv(verbose))
        else:
            from cli import proxy_master

            proxy_master.run(argv, verbose)
    except OSError as e:  # mitmweb raises its web server's (`--set web_port=…`)
        if e.errno == errno.EADDRINUSE and "Web server" in str(e):
            raise ports.unavailable(ports.MITMWEB, settings, e) from None
        raise
    return 0


def ui(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from monitor_ui.app import create_app

    ports.check(settings, ports.UI)
    verbose = getattr(args, "verbose", False)
    console.quiet(verbose)
    errors = logging.getLogger("uvicorn.error")
    errors.addFilter(ports.ListenFailure(ports.UI, settings))
    if not verbose:
        errors.addFilter(console.UvicornLines(f"http://{settings['ui.host']}:{settings['ui.port']}/"))
    # proxy_headers off: uvicorn would believe X-Forwarded-For from 127.0.0.1 by default; the app
    # believes it only from ui.trusted_proxies (monitor_ui/app.py).
    uvicorn.run(
        create_app(settings),
        host=settings["ui.host"],
        port=settings["ui.port"],
        log_level="info",
        access_log=verbose,  # a line per UI request: --verbose
        proxy_headers=False,
    )
    return 0


def without_workers(argv: list[str]) -> list[str]:
    """`argv` without --workers N (or --workers=N): the flag is the proxy's, `run.py ui` has none."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            kept.append(arg)
    return kept


def serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run proxy and UI as two child processes; stop both when either stops or we are told to."""
    # Every port first: a taken one stops the start before either server has begun.
    ports.check(settings, ports.PROXY, ports.UI, *([ports.MITMWEB] if args.web else []))
    stop = StopSignal()
    passthrough = [a for a in args.argv if a not in ("serve", "--web")]
    children = start_children(passthrough, args.web)
    print(
        f"keyrotor: proxy on http://{settings['proxy.host']}:{settings['proxy.port']}/v1"
        f" → {settings['proxy.upstream']}, UI on http://{settings['ui.host']}:{settings['ui.port']}/"
        + (f", mitmweb on http://{settings['ui.host']}:{settings['proxy.web_port']}/" if args.web else ""),
        flush=True,
    )
    return supervise(children, settings, stop)


class StopSignal:
    """From its creation, SIGTERM and SIGINT (Ctrl-C) ask to stop; `requested` says whether one came."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)
        signal.signal(signal.SIGINT, self._request)

    def _request(self, *_: object) -> None:
        self.requested = True


def start_children(argv: list[str], web: bool = False) -> list[subprocess.Popen[bytes]]:
    """`run.py proxy` and `run.py ui` with the same `argv` (flags, settings)."""
    run = [sys.executable, str(ROOT / "run.py")]
    return [
        subprocess.Popen([*run, "proxy", *(["--web"] if web else []), *argv]),
        subprocess.Popen([*run, "ui", *without_workers(argv)]),  # the UI runs once, whatever proxy.workers
    ]


def supervise(children: list[subprocess.Popen[bytes]], settings: Settings, stop: StopSignal) -> int:
    """Wait until a child ends or a stop is asked for, then stop every child (within the proxy's grace)."""
    while not stop.requested and all(child.poll() is None for child in children):
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings["proxy.stop_grace_seconds"] + STOP_MARGIN_SECONDS
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    codes = [child.returncode for child in children]
    # A child we stopped ends with 0 (or -SIGTERM); anything else is a failure worth passing on.
    return 0 if stop.requested else next((c for c in codes if c not in (0, -signal.SIGTERM)), 0)
