"""Client keys (the keys keyrotor issues): create (shown once), list with usage, enable, disable, delete."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from monitor_ui import views
from monitor_ui.auth import SESSION_COOKIE
from monitor_ui.deps import AdminApi, AdminApiChange, AdminForm, AdminPage, Conn, Signer, WriteConn
from storage import client_keys

router = APIRouter()

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$"


class NewClient(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="1-64 letters, digits, space, . _ @ -")


def client_summary(row) -> dict:
    return {
        "id": row["id"],
        "name": row["name"],
        "key": f"…{row['last4']}",
        "enabled": bool(row["enabled"]),
        "requests": row["requests"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "cost": row["cost"],
        "last_used_at": row["last_used_at"],
        "created_at": row["created_at"],
    }


def _render(request: Request, conn, signer, status_code: int = 200, **extra):
    csrf = signer.csrf_token(request.cookies.get(SESSION_COOKIE, ""))
    clients = [client_summary(r) for r in client_keys.list_clients(conn)]
    context = {"clients": clients, "csrf": csrf, "section": "clients", "iso": views.iso, **extra}
    return request.app.state.templates.TemplateResponse(request, "clients.html", context, status_code=status_code)


def _create(conn, name: str) -> str:
    try:
        return client_keys.create_client(conn, name)
    except client_keys.ClientExists as e:
        raise HTTPException(409, f"{str(e)[0].upper()}{str(e)[1:]}.") from None


@router.get("/clients", response_class=HTMLResponse, dependencies=[AdminPage])
def list_clients(request: Request, conn: Conn, signer: Signer):
    """Client keys with their usage."""
    return _render(request, conn, signer)


@router.get("/api/clients", dependencies=[AdminApi])
def list_clients_json(conn: Conn) -> dict:
    """Client keys with their usage, as JSON (never the keys: only their last four characters)."""
    return {"clients": [client_summary(r) for r in client_keys.list_clients(conn)]}


@router.post("/clients", response_class=HTMLResponse, dependencies=[AdminForm])
def create_client(request: Request, conn: WriteConn, signer: Signer, name: Annotated[str, Form()] = ""):
    """Issue a key; the page shows it this once."""
    name = name.strip()
    if not re.fullmatch(NAME_PATTERN, name):
        return _render(request, conn, signer, 422, error="A name is 1-64 letters, digits, spaces or . _ @ -.")
    try:
        key = _create(conn, name)
    except HTTPException as e:
        return _render(request, conn, signer, e.status_code, error=e.detail)
    return _render(request, conn, signer, created={"name": name, "key": key})


@router.post("/api/clients", dependencies=[AdminApiChange], status_code=201)
def create_client_json(new: NewClient, conn: WriteConn) -> dict:
    """Issue a key; the response carries it this once."""
    return {"name": new.name, "key": _create(conn, new.name)}


def _change(conn, client_id: int, action: str) -> int:
    if action == "delete":
        return client_keys.delete_client(conn, client_id)
    if action in ("enable", "disable"):
        return client_keys.set_enabled_by_id(conn, client_id, action == "enable")
    raise HTTPException(404, f"No client action {action!r}; use enable, disable or delete.")


@router.post("/clients/{client_id}/{action}", dependencies=[AdminForm])
def change_client(client_id: int, action: str, conn: WriteConn) -> RedirectResponse:
    """Enable, disable or delete a client key from the page; the proxy applies it within a second."""
    _change(conn, client_id, action)
    return RedirectResponse("/clients", status_code=303)


@router.post("/api/clients/{client_id}/{action}", dependencies=[AdminApiChange])
def change_client_json(client_id: int, action: str, conn: WriteConn) -> dict:
    """enable, disable or delete a client key."""
    if not _change(conn, client_id, action):
        raise HTTPException(404, f"No client with id {client_id}.")
    return {"id": client_id, "done": action}
