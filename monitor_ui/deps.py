"""What the handlers are given, as `Annotated` parameters: settings, templates, connections, the admin, a page.

Only this module reads `app.state` (which `create_app` fills); handlers name what they need.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.templating import Jinja2Templates

import config
from core import login_throttle
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


def refuse_guess(request: Request, throttle: LoginThrottle, settings: UiSettings, actor_kind: str) -> None:
    """A wrong admin key (login form, or Bearer): counted for its address, answered late; 429 while the
    address is locked. Never called for the right key, which is always accepted."""
    address = client_address(request)
    now = time.time()
    locked = throttle.retry_after(address, now)
    delay = throttle.failed(address, now) if locked is None else login_throttle.MAX_DELAY_SECONDS
    actor = audit.Actor(actor_kind, address)
    if locked is not None:
        audit.log_now(settings.db_path, "login.refused", None, {"retry_after": locked}, actor)
    else:
        audit.log_now(settings.db_path, "login.failed", None, None, actor)
    time.sleep(delay)  # a guesser waits; this runs in a worker thread, the app goes on serving
    if locked is not None:
        raise HTTPException(
            429,
            f"Too many wrong admin keys from this address; try again in {locked} seconds.",
            headers={"Retry-After": str(locked)},
        )


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _bearer_is_admin(request: Request, signer: SessionSigner, throttle: LoginThrottle, settings: UiSettings) -> bool:
    """Whether the request carries the admin key as Bearer; a wrong one is a guess, throttled like the form's."""
    token = _bearer(request)
    if token is None:
        return False
    if signer.check_admin_key(token):
        return True
    refuse_guess(request, throttle, settings, audit.ADMIN_API)
    return False


def _has_admin(request: Request, signer: SessionSigner, throttle: LoginThrottle, settings: UiSettings) -> bool:
    if signer.valid_session(request.cookies.get(SESSION_COOKIE)):
        return True
    return _bearer_is_admin(request, signer, throttle, settings)


def require_admin_page(request: Request, signer: Signer, throttle: Throttle, settings: Settings) -> None:
    if not _has_admin(request, signer, throttle, settings):
        raise LoginRequired()


def require_admin_api(request: Request, signer: Signer, throttle: Throttle, settings: Settings) -> None:
    if not _has_admin(request, signer, throttle, settings):
        raise HTTPException(401, "Log in, or send the admin key as 'Authorization: Bearer <admin key>'.")


def require_admin_api_change(request: Request, signer: Signer, throttle: Throttle, settings: Settings) -> None:
    """A state-changing API call: the admin key as Bearer, or a session plus its CSRF token in x-csrf-token."""
    if _bearer_is_admin(request, signer, throttle, settings):
        return
    session = request.cookies.get(SESSION_COOKIE)
    if not signer.valid_session(session):
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
