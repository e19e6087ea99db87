"""What the handlers are given, as `Annotated` parameters: settings, templates, connections, the admin, a page.

Only this module reads `app.state` (which `create_app` fills); handlers name what they need.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.templating import Jinja2Templates

import config
from core.addresses import Network
from core.login_throttle import LoginThrottle
from monitor_ui.auth import SESSION_COOKIE, SessionSigner
from monitor_ui.pages import Page
from storage import audit, db, secrets
from storage.upstream_keys import SqliteKeyStore


class LoginRequired(Exception):
    """An HTML page was asked for without a session: the app redirects to /login."""


@dataclass(frozen=True)
class UiSettings:
    """What the handlers read of the settings, taken once when the app is made."""

    db_path: Path
    upstream: str  # proxy.upstream: where key probes and the default upstream's model refreshes go
    proxy_url: str  # where clients send requests: what "copy as curl" points at
    metrics_token: str  # ui.metrics_token; "" for none
    trusted_proxies: tuple[Network, ...] = ()  # ui.trusted_proxies: whose X-Forwarded-For is believed
    redis_url: str = ""  # redis.url: the dashboard and /metrics say whether the nodes reach it (docs/redis.md)


def use_storage(settings: config.Settings) -> None:
    """The UI's database: SQLite at storage.path, or PostgreSQL at storage.url (every connection it opens)."""
    db.use_postgres(settings.storage.url or None)


def get_settings(request: Request) -> UiSettings:
    return request.app.state.settings


def get_config(request: Request) -> config.Settings:
    """Every setting, for what the UI sends through the proxy (it needs the proxy's port, the pass key)."""
    return request.app.state.config


def get_templates(request: Request) -> Jinja2Templates:
    return request.app.state.templates


def get_login_throttle(request: Request) -> LoginThrottle:
    return request.app.state.login_throttle


def get_signer(request: Request) -> SessionSigner:
    return request.app.state.signer


Settings = Annotated[UiSettings, Depends(get_settings)]
Config = Annotated[config.Settings, Depends(get_config)]
Templates = Annotated[Jinja2Templates, Depends(get_templates)]
Throttle = Annotated[LoginThrottle, Depends(get_login_throttle)]
Signer = Annotated[SessionSigner, Depends(get_signer)]


def get_conn(settings: Settings) -> Iterator[sqlite3.Connection]:
    conn = db.connect(settings.db_path, readonly=True)
    try:
        yield conn
    finally:
        conn.close()


def get_write_conn(settings: Settings) -> Iterator[sqlite3.Connection]:
    """For admin changes; the proxy sees them through the revision counters."""
    conn = db.connect(settings.db_path)
    try:
        yield conn
    finally:
        conn.close()


Conn = Annotated[sqlite3.Connection, Depends(get_conn)]
WriteConn = Annotated[sqlite3.Connection, Depends(get_write_conn)]


def get_key_store(conn: WriteConn, settings: Settings) -> SqliteKeyStore:
    """The upstream keys with their values (to add or probe them), over the request's write connection."""
    return SqliteKeyStore(conn, secrets.key_cipher(settings.db_path))


KeyStore = Annotated[SqliteKeyStore, Depends(get_key_store)]


def get_page(request: Request, templates: Templates, signer: Signer) -> Page:
    return Page(request, templates, signer.csrf_token(request.cookies.get(SESSION_COOKIE, "")))


PageOf = Annotated[Page, Depends(get_page)]


def client_address(request: Request) -> str:
    """The client's address (the app's middleware has put the one behind a trusted proxy in its place)."""
    return request.client.host if request.client else "unknown"


class TooManyGuesses(HTTPException):
    """429 with Retry-After: the address must wait before its next admin key is checked."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(429, message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


async def admin_key_checked(
    request: Request, signer: SessionSigner, throttle: LoginThrottle, settings: UiSettings, candidate: str, actor: str
) -> bool:
    """Whether `candidate` is the admin key (login form or Bearer). A wrong one is counted for its address and
    answered late; TooManyGuesses while the address is locked, or while an earlier wrong key of it is held.

    The throttle is read, the key checked and the failure counted with no await between them, so parallel
    attempts from one address are checked one held answer at a time (core/login_throttle.py). The wait is
    awaited, holding no worker thread: the guesses of one address cannot delay anyone else's login.
    """
    address = client_address(request)
    now = time.time()
    busy = throttle.busy(address, now)
    if busy is not None:
        await _audit(settings, "login.refused", {"retry_after": busy}, audit.Actor(actor, address))
        raise TooManyGuesses(
            f"A wrong admin key from this address is still being answered; try again in {busy} seconds.", busy
        )
    if len(candidate) <= MAX_KEY_LENGTH and signer.check_admin_key(candidate):
        return True
    locked = throttle.retry_after(address, now)
    delay = throttle.failed(address, now)
    if locked is not None:
        await _audit(settings, "login.refused", {"retry_after": locked}, audit.Actor(actor, address))
    else:
        await _audit(settings, "login.failed", None, audit.Actor(actor, address))
    await asyncio.sleep(delay)  # a guesser waits; nobody else does
    if locked is not None:
        locked = throttle.retry_after(address, time.time()) or locked
        raise TooManyGuesses(f"Too many wrong admin keys from this address; try again in {locked} seconds.", locked)
    return False


MAX_KEY_LENGTH = 1000  # longer is no admin key: not even hashed


async def _audit(settings: UiSettings, action: str, changes: dict | None, actor: audit.Actor) -> None:
    await run_in_threadpool(audit.log_now, settings.db_path, action, None, changes, actor)


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def _bearer_is_admin(
    request: Request, signer: SessionSigner, throttle: LoginThrottle, settings: UiSettings
) -> bool:
    """Whether the request carries the admin key as Bearer; a wrong one is a guess, throttled like the form's."""
    token = _bearer(request)
    if token is None:
        return False
    return await admin_key_checked(request, signer, throttle, settings, token, audit.ADMIN_API)


async def _has_admin(request: Request, signer: SessionSigner, throttle: LoginThrottle, settings: UiSettings) -> bool:
    if await run_in_threadpool(signer.valid_session, request.cookies.get(SESSION_COOKIE)):
        return True
    return await _bearer_is_admin(request, signer, throttle, settings)


async def require_admin_page(request: Request, signer: Signer, throttle: Throttle, settings: Settings) -> None:
    if not await _has_admin(request, signer, throttle, settings):
        raise LoginRequired()


async def require_admin_api(request: Request, signer: Signer, throttle: Throttle, settings: Settings) -> None:
    if not await _has_admin(request, signer, throttle, settings):
        raise HTTPException(401, "Log in, or send the admin key as 'Authorization: Bearer <admin key>'.")


async def require_admin_api_change(request: Request, signer: Signer, throttle: Throttle, settings: Settings) -> None:
    """A state-changing API call: the admin key as Bearer, or a session plus its CSRF token in x-csrf-token."""
    if await _bearer_is_admin(request, signer, throttle, settings):
        return
    session = request.cookies.get(SESSION_COOKIE)
    if not await run_in_threadpool(signer.valid_session, session):
        raise HTTPException(401, "Log in, or send the admin key as 'Authorization: Bearer <admin key>'.")
    if not signer.valid_csrf(session, request.headers.get("x-csrf-token")):
        raise HTTPException(403, "A change made with a session cookie needs the page's CSRF token in x-csrf-token.")


async def require_form(request: Request, signer: Signer) -> None:
    """Refuse a form post without a session (redirect to login) or without the page's CSRF token (403)."""
    session = request.cookies.get(SESSION_COOKIE)
    if not signer.valid_session(session):
        raise LoginRequired()
    form = await request.form()
    if not signer.valid_csrf(session, str(form.get("csrf", ""))):
        raise HTTPException(403, "Missing or wrong CSRF token: reload the page and try again.")


AdminPage = Depends(require_admin_page)
AdminApi = Depends(require_admin_api)
AdminApiChange = Depends(require_admin_api_change)
AdminForm = Depends(require_form)
