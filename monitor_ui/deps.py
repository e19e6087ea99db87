"""Dependencies shared by the routes: database connection, admin authentication."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from monitor_ui.auth import SESSION_COOKIE, SessionSigner
from storage import db


class LoginRequired(Exception):
    """An HTML page was asked for without a session: the app redirects to /login."""


def get_conn(request: Request) -> Iterator[sqlite3.Connection]:
    conn = db.connect(request.app.state.db_path, readonly=True)
    try:
        yield conn
    finally:
        conn.close()


def get_write_conn(request: Request) -> Iterator[sqlite3.Connection]:
    """For admin changes; the proxy sees them through the revision counters."""
    conn = db.connect(request.app.state.db_path)
    try:
        yield conn
    finally:
        conn.close()


def get_signer(request: Request) -> SessionSigner:
    return request.app.state.signer


def _has_admin(request: Request, signer: SessionSigner) -> bool:
    if signer.valid_session(request.cookies.get(SESSION_COOKIE)):
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and signer.check_admin_key(token.strip())


def require_admin_page(request: Request, signer: Annotated[SessionSigner, Depends(get_signer)]) -> None:
    if not _has_admin(request, signer):
        raise LoginRequired()


def require_admin_api(request: Request, signer: Annotated[SessionSigner, Depends(get_signer)]) -> None:
    if not _has_admin(request, signer):
        raise HTTPException(401, "Log in, or send the admin key as 'Authorization: Bearer <admin key>'.")


def require_admin_api_change(request: Request, signer: Annotated[SessionSigner, Depends(get_signer)]) -> None:
    """A state-changing API call: the admin key as Bearer, or a session plus its CSRF token in x-csrf-token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and signer.check_admin_key(token.strip()):
        return
    session = request.cookies.get(SESSION_COOKIE)
    if not signer.valid_session(session):
        raise HTTPException(401, "Log in, or send the admin key as 'Authorization: Bearer <admin key>'.")
    if not signer.valid_csrf(session, request.headers.get("x-csrf-token")):
        raise HTTPException(403, "A change made with a session cookie needs the page's CSRF token in x-csrf-token.")


async def check_form(request: Request, signer: SessionSigner) -> None:
    """Refuse a form post without a session (redirect to login) or without the page's CSRF token (403)."""
    session = request.cookies.get(SESSION_COOKIE)
    if not signer.valid_session(session):
        raise LoginRequired()
    form = await request.form()
    if not signer.valid_csrf(session, str(form.get("csrf", ""))):
        raise HTTPException(403, "Missing or wrong CSRF token: reload the page and try again.")


Conn = Annotated[sqlite3.Connection, Depends(get_conn)]
Signer = Annotated[SessionSigner, Depends(get_signer)]
AdminPage = Depends(require_admin_page)
AdminApi = Depends(require_admin_api)
AdminApiChange = Depends(require_admin_api_change)


async def require_form(request: Request, signer: Annotated[SessionSigner, Depends(get_signer)]) -> None:
    await check_form(request, signer)


AdminForm = Depends(require_form)
WriteConn = Annotated[sqlite3.Connection, Depends(get_write_conn)]
