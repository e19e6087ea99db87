"""`demo`: keyrotor in one command, without an API key.

A local fake upstream (cli/demo_upstream.py), a throwaway database in a temporary directory (or the
one --storage-path names, never storage.path's), three fake upstream keys, a client `demo` whose key is
printed, proxy and UI as `serve` runs them, and a few requests so the dashboard has something to show.
Ctrl-C stops everything and removes the temporary directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

from cli import serve
from cli.demo_upstream import KEY_PREFIX, DemoUpstream
from config import ConfigError, Settings, load_settings
from storage import client_keys, db, secrets
from storage.upstream_keys import SqliteKeyStore
from usecases import keys as key_admin

CLIENT = "demo"
# Fake upstream keys (the demo upstream accepts any key with its prefix); they are never printed.
UPSTREAM_KEYS = [f"Demo key {n}\t{KEY_PREFIX}{n}-0123456789abcdefghijklmnop" for n in (1, 2, 3)]
START_SECONDS = 60
PROMPTS = (
    "What does a reverse proxy do?",
    "Write a haiku about rotating API keys.",
    "Name three things a gateway should record.",
)


def command(args: argparse.Namespace, settings: Settings) -> int:
    own_database = args.storage_path is not None
    if own_database and _same_file(settings.storage_path, load_settings(args.config).storage_path):
        raise ConfigError(
            "run.py demo adds fake keys and a demo client: give it a database of its own with --storage-path,"
            " not keyrotor's (storage.path)."
        )
    for name in ("proxy.port", "ui.port"):
        if _in_use(settings[name.replace("port", "host")], settings[name]):
            flag = "--proxy-port" if name == "proxy.port" else "--ui-port"
            raise ConfigError(
                f"port {settings[name]} ({name}) is in use, perhaps by keyrotor itself: give the demo"
                f" another one, e.g. run.py demo {flag} {_free_port()}."
            )
    workdir = None if own_database else Path(tempfile.mkdtemp(prefix="keyrotor-demo-"))
    path = settings.storage_path if workdir is None else workdir / "keyrotor.db"
    stop = serve.StopSignal()
    upstream = DemoUpstream().start()
    try:
        demo = replace(
            settings,
            storage=replace(settings.storage, path=str(path)),
            proxy=replace(settings.proxy, upstream=upstream.url),
        )
        admin_key, client_key = _prepare(demo)
        argv = [a for a in args.argv if a != "demo"] + ["--storage-path", str(path), "--upstream", upstream.url]
        children = serve.start_children(argv)
        if not _wait_ready(demo, children, stop):  # stopped while starting (0), or a child failed (non-zero)
            code = serve.supervise(children, demo, stop)
            return code if stop.requested else code or 1
        sent = _send_traffic(demo, client_key, stop)
        _print_welcome(demo, upstream.url, workdir, admin_key, client_key, sent)
        return serve.supervise(children, demo, stop)
    finally:
        upstream.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _prepare(settings: Settings) -> tuple[str | None, str]:
    """Database, secrets, the fake upstream keys and the demo client: (admin key if new, the client's key)."""
    path = settings.storage_path
    db.ensure_database(path)
    cipher = secrets.key_cipher(path)
    admin_key = secrets.ensure_admin_key(path)
    conn = db.connect(path)
    try:
        key_admin.add_keys(SqliteKeyStore(conn, cipher), UPSTREAM_KEYS)
        try:
            client_key = client_keys.create_client(conn, CLIENT)
        except client_keys.ClientExists:  # a database of a previous demo: one more key
            client_key = client_keys.add_key(conn, CLIENT)[1]
    finally:
        conn.close()
    return admin_key, client_key


def _wait_ready(settings: Settings, children: list[subprocess.Popen[bytes]], stop: serve.StopSignal) -> bool:
    """Whether proxy and UI accept connections before either child ends, a stop or START_SECONDS."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and not stop.requested:
        if any(child.poll() is not None for child in children):
            return False
        if all(_in_use(settings[f"{part}.host"], settings[f"{part}.port"]) for part in ("proxy", "ui")):
            return True
        time.sleep(0.2)
    if not stop.requested:
        print(f"keyrotor: the demo's proxy and UI did not start within {START_SECONDS} s.", file=sys.stderr)
    return False


def _send_traffic(settings: Settings, client_key: str, stop: serve.StopSignal) -> int:
    """A few requests as a client would send them (chat, streamed chat, embeddings, a missing model)."""
    base = f"http://{settings['proxy.host']}:{settings['proxy.port']}/v1"
    chat = "/chat/completions"
    requests = [
        *(("POST", chat, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": p}]}) for p in PROMPTS),
        ("POST", chat, {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Count to 5."}]}),
        ("POST", "/embeddings", {"model": "text-embedding-3-small", "input": ["key rotation", "reverse proxy"]}),
        ("POST", chat, {"model": "gpt-unknown", "messages": [{"role": "user", "content": "Which model am I?"}]}),
        ("GET", "/models", None),
    ]
    sent = 0
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {client_key}"}, timeout=30) as client:
        for method, path, body in requests:
            if stop.requested:
                break
            try:
                client.request(method, base + path, json=body).read()
            except httpx.HTTPError:
                continue
            sent += 1
    return sent


def _print_welcome(
    settings: Settings, upstream_url: str, workdir: Path | None, admin_key: str | None, client_key: str, sent: int
) -> None:
    proxy = f"http://{settings['proxy.host']}:{settings['proxy.port']}/v1"
    ui = f"http://{settings['ui.host']}:{settings['ui.port']}/"
    kept = "deleted when the demo stops" if workdir else "kept"
    admin = admin_key or (
        "KEYROTOR_ADMIN_KEY's"
        if os.environ.get("KEYROTOR_ADMIN_KEY")
        else f"the one printed when it was made (a new one: run.py admin rotate --storage-path {settings.storage_path})"
    )
    body = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}'
    print(
        f"""
  keyrotor demo: a fake upstream on {upstream_url} answers; nothing leaves this machine.
    database    {settings.storage_path} ({kept}; not your keyrotor's data)
    proxy       {proxy}
    UI          {ui}  admin key: {admin}
    client key  {client_key}

  {sent} requests were sent so the dashboard is not empty. Try one yourself:

    curl {proxy}/chat/completions -H "Authorization: Bearer {client_key}" \\
      -H "content-type: application/json" -d '{body}'

  or any OpenAI client with base_url={proxy} and api_key=<the client key>.
  Ctrl-C stops the demo.
""",
        flush=True,
    )
