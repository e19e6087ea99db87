"""`serve`, `proxy` and `ui`: start the proxy (mitmdump, or mitmweb with --web) and the monitor UI."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

from config import ADDON_SETTINGS, ROOT, Settings
from storage import secrets

SCRIPT = ROOT / "addons" / "keyrotor.py"
# How long `serve` waits for its children beyond the proxy's own grace for requests in
# flight: the writer's flush (up to writer.STOP_RETRY_SECONDS when the database refuses writes).
STOP_MARGIN_SECONDS = 15


def proxy_argv(settings: Settings, web: bool) -> list[str]:
    argv = [
        "-s",
        str(SCRIPT),
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
    from mitmproxy.tools import main

    if args.worker_index is None and settings["proxy.workers"] > 1:
        from cli import workers

        return workers.supervise(args, settings)
    argv = proxy_argv(settings, args.web)
    if args.worker_index is not None:
        argv += worker_options(settings, args.worker_index)
    (main.mitmweb if args.web else main.mitmdump)(argv)
    return 0


def ui(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from monitor_ui.app import create_app

    # proxy_headers off: uvicorn would believe X-Forwarded-For from 127.0.0.1 by default; the app
    # believes it only from ui.trusted_proxies (monitor_ui/app.py).
    uvicorn.run(
        create_app(settings),
        host=settings["ui.host"],
        port=settings["ui.port"],
        log_level="info",
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
    passthrough = [a for a in args.argv if a not in ("serve", "--web")]
    run = [sys.executable, str(ROOT / "run.py")]
    children = [
        subprocess.Popen([*run, "proxy", *(["--web"] if args.web else []), *passthrough]),
        subprocess.Popen([*run, "ui", *without_workers(passthrough)]),  # the UI runs once, whatever proxy.workers
    ]
    print(
        f"keyrotor: proxy on http://{settings['proxy.host']}:{settings['proxy.port']}/v1"
        f" → {settings['proxy.upstream']}, UI on http://{settings['ui.host']}:{settings['ui.port']}/"
        + (f", mitmweb on http://{settings['ui.host']}:{settings['proxy.web_port']}/" if args.web else ""),
        flush=True,
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and all(child.poll() is None for child in children):
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
    return 0 if stopping else next((c for c in codes if c not in (0, -signal.SIGTERM)), 0)
