"""Clients: create (first key shown once), list with limits and spend, a detail page with keys, limits,
spend against budget and recent flows; enable, disable, delete; keys added and revoked.

The same through /api/clients. Limits are named as `run.py clients add|set` names them (models, groups,
rpm, tpm, max_parallel, daily_tokens, monthly_tokens, daily_usd, monthly_usd, expires, ips); 'none'
or null clears one.
"""

from __future__ import annotations

import re
import time
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Body, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from core.limits import NO_LIMITS, LimitError, limits_shown, policy_with
from monitor_ui import shapes, views
from monitor_ui.deps import AdminApi, AdminApiChange, AdminForm, AdminPage, Conn, PageOf, WriteConn
from monitor_ui.pages import Page, done_or_refused, see_other
from storage import client_keys, objects
from storage.counters import clients_spend

router = APIRouter(prefix="/clients", tags=["clients"])
api = APIRouter(prefix="/api/clients", tags=["clients"])

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$"
# The limits as the CLI's flags name them (dashes as underscores) → core.limits.ClientPolicy's fields.
LIMITS = {
    "models": "models",
    "groups": "groups",
    "rpm": "rpm",
    "tpm": "tpm",
    "max_parallel": "max_parallel",
    "daily_tokens": "daily_tokens",
    "monthly_tokens": "monthly_tokens",
    "daily_usd": "daily_usd",
    "monthly_usd": "monthly_usd",
    "expires": "expires_at",
    "ips": "ips",
}
BUDGETS = (
    ("day_tokens", "daily_tokens", "tokens today"),
    ("month_tokens", "monthly_tokens", "tokens this month"),
    ("day_usd", "daily_usd", "USD today"),
    ("month_usd", "monthly_usd", "USD this month"),
)


class NewClient(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="1-64 letters, digits, space, . _ @ -")
    limits: dict[str, Any] = Field(default_factory=dict, description="limits by name; null or 'none' clears one")


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def limit_changes(values: dict[str, Any], only_given: bool = True) -> dict[str, str | None]:
    """Limits by their public names → policy fields and text; unknown names are a 422."""
    unknown = sorted(set(values) - set(LIMITS))
    if unknown:
        raise HTTPException(422, f"No limit named {unknown[0]!r}; the limits are {', '.join(LIMITS)}.")
    return {LIMITS[name]: _as_text(value) for name, value in values.items() if not only_given or value is not None}


def _budgets(policy, spend: dict[str, float]) -> list[dict]:
    bars = []
    for kind, field, label in BUDGETS:
        limit = getattr(policy, field)
        if limit is None:
            continue
        spent = spend.get(kind, 0.0)
        bars.append(
            {
                "kind": kind,
                "label": label,
                "limit": limit,
                "spent": spent,
                "percent": min(100, round(100 * spent / limit)),
            }
        )
    return bars


def client_summary(row, spend: dict[str, float] | None = None) -> dict:
    policy = client_keys.policy_of(row["limits"])
    spend = spend or {}
    return {
        "id": row["id"],
        "name": row["name"],
        "key": f"…{row['last4']}" if row["last4"] else None,
        "keys": row["keys"],
        "enabled": bool(row["enabled"]),
        "legacy_objects": bool(row["legacy_objects"]),
        **views.usage(row),
        "limits": limits_shown(policy),
        "spend": {k: spend.get(k, 0.0) for k in ("day_tokens", "day_usd", "month_tokens", "month_usd")},
        "budgets": _budgets(policy, spend),
    }


def summaries(conn) -> list[dict]:
    rows = client_keys.list_clients(conn)
    spend = clients_spend(conn, [r["id"] for r in rows], time.time())
    return [client_summary(r, spend[r["id"]]) for r in rows]


def key_summary(row) -> dict:
    return {
        "id": row["id"],
        "key": f"…{row['last4']}",
        "state": "revoked" if row["revoked_at"] else "active" if row["enabled"] else "disabled",
        "requests": row["requests"],
        "cost": row["cost"],
        "last_used_at": row["last_used_at"],
        "created_at": row["created_at"],
        "revoked_at": row["revoked_at"],
    }


def detail(conn, client_id: int) -> dict:
    row = client_keys.summary_of(conn, client_id)
    if row is None:
        raise HTTPException(404, f"No client with id {client_id}.")
    spend = clients_spend(conn, [client_id], time.time())[client_id]
    summary = client_summary(row, spend)
    summary["keys"] = [key_summary(k) for k in client_keys.keys_of(conn, client_id)]
    summary["recent_flows"] = [dict(f) for f in client_keys.recent_flows(conn, client_id)]
    summary["objects"] = objects.objects_of_client(conn, client_id, limit=50)  # tenancy: what it made
    return summary


def _render(page: Page, conn, status_code: int = 200, **extra) -> HTMLResponse:
    context = {"clients": summaries(conn), "section": "clients", "iso": views.iso, "limit_names": list(LIMITS)}
    return page.render("clients.html", {**context, **extra}, status_code)


def _render_detail(page: Page, conn, client_id: int, status_code: int = 200, **extra) -> HTMLResponse:
    context = {"client": detail(conn, client_id), "section": "clients", "iso": views.iso, "limit_names": list(LIMITS)}
    return page.render("client.html", {**context, **extra}, status_code)


def _create(conn, name: str, limits: dict[str, str | None]) -> str:
    try:
        policy = policy_with(NO_LIMITS, limits)
        return client_keys.create_client(conn, name, policy)
    except LimitError as e:
        raise HTTPException(422, _sentence(e)) from None
    except client_keys.ClientExists as e:
        raise HTTPException(409, f"{str(e)[0].upper()}{str(e)[1:]}.") from None


def _name_of(conn, client_id: int) -> str:
    row = client_keys.client_by_id(conn, client_id)
    if row is None:
        raise HTTPException(404, f"No client with id {client_id}.")
    return row["name"]


def _set_limits(conn, client_id: int, changes: dict[str, str | None]) -> None:
    try:
        client_keys.set_limits(conn, _name_of(conn, client_id), changes)
    except LimitError as e:
        raise HTTPException(422, _sentence(e)) from None


def _sentence(error: Exception) -> str:
    text = str(error)
    return text if text.endswith(".") else f"{text}."


async def _form_limits(request: Request) -> dict[str, str | None]:
    form = await request.form()
    return {LIMITS[name]: str(form[name]) for name in LIMITS if name in form}


# ------------------------------------------------------------------ pages


@router.get("", response_class=HTMLResponse, dependencies=[AdminPage])
def list_clients(page: PageOf, conn: Conn):
    """Clients with their limits, spend today and this month, and usage."""
    return _render(page, conn)


@router.post("", response_class=HTMLResponse, dependencies=[AdminForm])
async def create_client(request: Request, page: PageOf, conn: WriteConn, name: Annotated[str, Form()] = ""):
    """Create a client with its first key (the page shows it this once) and the limits filled in."""
    name = name.strip()
    if not re.fullmatch(NAME_PATTERN, name):
        return _render(page, conn, 422, error="A name is 1-64 letters, digits, spaces or . _ @ -.")
    limits = {k: v for k, v in (await _form_limits(request)).items() if v.strip()}
    try:
        key = _create(conn, name, limits)
    except HTTPException as e:
        return _render(page, conn, e.status_code, error=e.detail)
    return _render(page, conn, created={"name": name, "key": key})


@router.get("/{client_id}", response_class=HTMLResponse, dependencies=[AdminPage])
def read_client(page: PageOf, client_id: int, conn: Conn):
    """One client: its keys, limits, spend against budget, recent flows."""
    return _render_detail(page, conn, client_id)


@router.post("/{client_id}/limits", response_class=HTMLResponse, dependencies=[AdminForm])
async def change_limits(request: Request, page: PageOf, client_id: int, conn: WriteConn) -> Response:
    """Set the limits as the form has them (an empty field clears one)."""
    limits = await _form_limits(request)

    def save() -> str:
        _set_limits(conn, client_id, limits)
        return f"/clients/{client_id}"

    return done_or_refused(save, partial(_render_detail, page, conn, client_id), missing_raises=True)


@router.post("/{client_id}/keys", response_class=HTMLResponse, dependencies=[AdminForm])
def add_client_key(page: PageOf, client_id: int, conn: WriteConn):
    """Issue another key for the client; the page shows it this once."""
    key_id, key = client_keys.add_key(conn, _name_of(conn, client_id))
    return _render_detail(page, conn, client_id, created={"id": key_id, "key": key})


@router.post("/{client_id}/keys/{key_id}/revoke", dependencies=[AdminForm])
def revoke_client_key(client_id: int, key_id: int, conn: WriteConn) -> RedirectResponse:
    """Revoke one key; the client and its history stay."""
    client_keys.revoke_key(conn, _name_of(conn, client_id), key_id)
    return see_other(f"/clients/{client_id}")


def _change(conn, client_id: int, action: str) -> int:
    if action == "delete":
        return client_keys.delete_client(conn, client_id)
    if action in ("enable", "disable"):
        return client_keys.set_enabled_by_id(conn, client_id, action == "enable")
    raise HTTPException(404, f"No client action {action!r}; use enable, disable or delete.")


@router.post("/{client_id}/{action}", dependencies=[AdminForm])
def change_client(client_id: int, action: str, conn: WriteConn) -> RedirectResponse:
    """Enable, disable or delete a client from the page; the proxy applies it within a second."""
    _change(conn, client_id, action)
    return see_other("/clients")


# ------------------------------------------------------------------ API


@api.get("", dependencies=[AdminApi], response_model=shapes.ClientList)
def list_clients_json(conn: Conn) -> dict:
    """Clients with limits, spend and usage (never a key: only its last four characters)."""
    return {"clients": summaries(conn)}


@api.post("", dependencies=[AdminApiChange], status_code=201, response_model=shapes.ClientCreated)
def create_client_json(new: NewClient, conn: WriteConn) -> dict:
    """Create a client with its first key; the response carries the key this once."""
    key = _create(conn, new.name, limit_changes(new.limits))
    return {"name": new.name, "key": key}


@api.get("/{client_id}", dependencies=[AdminApi], response_model=shapes.ClientDetail)
def read_client_json(client_id: int, conn: Conn) -> dict:
    """One client: keys, limits, spend against budget, recent flows."""
    return detail(conn, client_id)


@api.patch("/{client_id}", dependencies=[AdminApiChange], response_model=shapes.ClientDetail)
def change_limits_json(client_id: int, conn: WriteConn, limits: Annotated[dict[str, Any], Body()]) -> dict:
    """Change some limits: {"rpm": 60, "models": ["gpt-4o*"], "expires": null}; null or 'none' clears one.
    {"legacy_objects": true} lets the client reach objects no client made (false: not)."""
    limits = dict(limits)
    legacy = limits.pop("legacy_objects", None)
    if legacy is not None and not isinstance(legacy, bool):
        raise HTTPException(422, "legacy_objects must be true or false.")
    changes = limit_changes(limits, only_given=False)
    if legacy is not None:
        client_keys.set_legacy_objects(conn, _name_of(conn, client_id), legacy)
    if changes or legacy is None:
        _set_limits(conn, client_id, changes)
    return detail(conn, client_id)


@api.post("/{client_id}/keys", dependencies=[AdminApiChange], status_code=201, response_model=shapes.ClientKeyCreated)
def add_client_key_json(client_id: int, conn: WriteConn) -> dict:
    """Another key for the client; the response carries it this once."""
    key_id, key = client_keys.add_key(conn, _name_of(conn, client_id))
    return {"id": key_id, "key": key}


@api.post("/{client_id}/keys/{key_id}/revoke", dependencies=[AdminApiChange], response_model=shapes.Done)
def revoke_client_key_json(client_id: int, key_id: int, conn: WriteConn) -> dict:
    """Revoke one key of the client."""
    if not client_keys.revoke_key(conn, _name_of(conn, client_id), key_id):
        raise HTTPException(404, f"Client {client_id} has no key #{key_id} that is not revoked already.")
    return {"id": key_id, "done": "revoke"}


@api.post("/{client_id}/{action}", dependencies=[AdminApiChange], response_model=shapes.Done)
def change_client_json(client_id: int, action: str, conn: WriteConn) -> dict:
    """enable, disable or delete a client."""
    if not _change(conn, client_id, action):
        raise HTTPException(404, f"No client with id {client_id}.")
    return {"id": client_id, "done": action}
