"""Requests the UI sends through the proxy under a client: replays, the playground, trace probes.

The UI never calls upstream itself: it is a client of the proxy like any other, so what it
sends is routed, limited, retried and captured like every flow. It cannot present a client
key (only their sha256 is stored), so it mints a pass (core/passes.py) naming the client and
where the admin pinned the request; the proxy's Access addon verifies it.

    async with open_through_proxy(settings, client_id, "POST", "/v1/chat/completions", body,
                                  group_id=3) as response:
        async for chunk in response.aiter_bytes(): ...

The pass is in a header the proxy strips before anything else sees the request; it is good
for one request and two minutes, and is never logged.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from config import Settings
from core import passes
from storage import audit, client_keys, secrets
from storage.db import bump_revision

PLAYGROUND = "playground"
# What a replay does not copy from the recorded request: what the proxy or httpx sets, and credentials.
NOT_COPIED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "accept-encoding",
        "content-encoding",
        "authorization",
        "api-key",
        "x-api-key",
        "proxy-authorization",
        "cookie",
        passes.PASS_HEADER,
    }
)
ANSWER_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=10.0)


class Target(Protocol):
    """Where the proxy is and where its secret lies: the UI's settings (monitor_ui/deps.py UiSettings) are one."""

    @property
    def db_path(self) -> Path: ...

    @property
    def proxy_url(self) -> str: ...


@dataclass(frozen=True)
class ProxyTarget:
    """A Target made from the settings (run.py's commands)."""

    db_path: Path
    proxy_url: str

    @classmethod
    def of(cls, settings: Settings) -> ProxyTarget:
        return cls(settings.storage_path, f"http://{settings.proxy.host}:{settings.proxy.port}")


def loopback(proxy_url: str) -> str:
    """`proxy_url` with a wildcard listening address replaced by loopback, where the UI reaches it."""
    parts = urlsplit(proxy_url)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme or 'http'}://{host}:{parts.port or 8080}"


def build_pass(
    settings: Target,
    client_id: int,
    *,
    group_id: int | None = None,
    key_id: int | None = None,
    replay_of: int | None = None,
) -> str:
    """A signed pass for one request as client `client_id` (core/passes.py)."""
    key = secrets.pass_key(settings.db_path)
    return passes.mint(key, client_id, group_id=group_id, key_id=key_id, replay_of=replay_of)


def copied_headers(headers: Iterable[tuple[str, str]] | Mapping[str, str] | None) -> list[tuple[str, str]]:
    """`headers` (a recorded request's, say) without what the proxy, httpx or a credential sets."""
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(n, v) for n, v in items if n.lower() not in NOT_COPIED and v != "[redacted]"]


@asynccontextmanager
async def open_through_proxy(
    settings: Target,
    client_id: int,
    method: str,
    path: str,
    body: bytes | None,
    *,
    headers: Iterable[tuple[str, str]] | Mapping[str, str] | None = None,
    group_id: int | None = None,
    key_id: int | None = None,
    replay_of: int | None = None,
    extra_headers: Mapping[str, str] | None = None,
    timeout: httpx.Timeout = ANSWER_TIMEOUT,
) -> AsyncIterator[httpx.Response]:
    """The proxy's answer to `method path` sent under client `client_id`, pinned where asked: a streaming
    httpx response (read it with `aiter_bytes`, or `aread`); closed when the block ends."""
    sent = copied_headers(headers)
    sent += list((extra_headers or {}).items())
    names = {n.lower() for n, _ in sent}
    if body and "content-type" not in names:
        sent.append(("content-type", "application/json"))
    sent.append(
        (passes.PASS_HEADER, build_pass(settings, client_id, group_id=group_id, key_id=key_id, replay_of=replay_of))
    )
    # trust_env off: the loopback request must not go through an HTTP(S)_PROXY of the environment.
    async with httpx.AsyncClient(base_url=loopback(settings.proxy_url), timeout=timeout, trust_env=False) as client:
        request = client.build_request(method, path, content=body, headers=sent)
        response = await client.send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()


def ensure_builtin_client(conn: sqlite3.Connection, name: str = PLAYGROUND) -> int:
    """The id of built-in client `name` (the playground's), made when missing: a client like any other
    (limits, budget, its flows), whose one key is never shown, since only passes use it; marked built-in.

    A client the proxy knows has an active key (storage/client_keys.py load_enabled), so one is kept."""
    row = conn.execute("SELECT id, builtin FROM clients WHERE name = ?", (name,)).fetchone()
    if row is None:
        try:
            client_keys.create_client(conn, name)  # its key is thrown away: nobody needs it
        except client_keys.ClientExists:
            pass  # made meanwhile by another request
        row = conn.execute("SELECT id, builtin FROM clients WHERE name = ?", (name,)).fetchone()
    client_id = int(row[0])
    if not row[1]:
        with conn:
            conn.execute("UPDATE clients SET builtin = 1, changed_at = ? WHERE id = ?", (time.time(), client_id))
            audit.record(conn, "clients.builtin", name, {"id": client_id})
            bump_revision(conn, "clients")
    if all(k["revoked_at"] for k in client_keys.keys_of(conn, client_id)):
        client_keys.add_key(conn, name)  # every key revoked: the proxy would not know the client
    return client_id
