"""Upstreams (OpenAI, Azure resources, relay stations) with their groups: the admin page and its JSON API.

Every change goes through storage.routes, which bumps the routes revision: running proxies
rebuild their route table within a second.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from core.dialects import DEFAULT_AZURE_API_VERSION
from core.routing import Dialect
from monitor_ui import views
from monitor_ui.auth import SESSION_COOKIE
from monitor_ui.deps import AdminApi, AdminApiChange, AdminForm, AdminPage, Conn, Signer, WriteConn
from monitor_ui.errors import refused_as_http
from monitor_ui.fields import NAME_RULE, ApiVersion, BaseUrl, Name, from_form
from storage import routes

router = APIRouter()

# What a finished action says on the page after its redirect; the query carries only the code and counts.
DONE = {
    "added": "Upstream added: give it a group below.",
    "edited": "Upstream saved.",
    "enabled": "Upstream enabled.",
    "disabled": "Upstream disabled: its groups serve nothing until it is enabled.",
}


class NewUpstream(BaseModel):
    name: Name = Field(description=NAME_RULE)
    base_url: BaseUrl = Field(description="http(s) URL; a trailing /v1 is fine")
    dialect: Dialect = Dialect.OPENAI
    api_version: ApiVersion = Field(None, description=f"Azure's api-version (default {DEFAULT_AZURE_API_VERSION})")


class UpstreamChange(BaseModel):
    """What PUT /api/upstreams/{name} may change; fields left out stay as they are."""

    base_url: BaseUrl | None = Field(None, description="null: the proxy's own upstream (proxy.upstream)")
    dialect: Dialect | None = None
    api_version: ApiVersion = Field(None, description="null clears it")


def upstream_summary(row, groups: list) -> dict:
    return {
        "id": row["id"],
        "name": row["name"],
        "base_url": row["base_url"],  # None: proxy.upstream
        "dialect": row["dialect"],
        "api_version": row["api_version"],
        "enabled": bool(row["enabled"]),
        "groups": row["groups"],
        "keys": row["keys"],
        "created_at": row["created_at"],
        "group_list": [g for g in groups if g["upstream"] == row["name"]],
    }


def _upstreams(conn) -> list[dict]:
    groups = [views.group_summary(g) for g in routes.list_groups(conn)]
    return [upstream_summary(row, groups) for row in routes.list_upstreams(conn)]


def _upstream(conn, name: str) -> dict:
    for upstream in _upstreams(conn):
        if upstream["name"] == name:
            return upstream
    raise HTTPException(404, f"No upstream named {name!r}.")


def _add(conn, new: NewUpstream) -> int:
    with refused_as_http():
        return routes.add_upstream(conn, new.name, new.base_url, new.dialect, new.api_version)


def _edit(conn, name: str, change: UpstreamChange) -> None:
    _upstream(conn, name)
    changes = {field: getattr(change, field) for field in change.model_fields_set}
    if changes.get("dialect", "") is None:
        raise HTTPException(422, "dialect must be openai or azure.")
    with refused_as_http():
        routes.update_upstream(conn, name, **changes)


def _set_enabled(conn, name: str, enabled: bool) -> None:
    with refused_as_http():
        routes.set_upstream_enabled(conn, name, enabled)


def _delete(conn, name: str) -> dict:
    upstream = _upstream(conn, name)
    with refused_as_http():
        keys = routes.delete_upstream(conn, name)
    return {"name": name, "deleted": True, "groups": upstream["groups"], "keys": keys}


def render_upstreams(request: Request, conn, signer, status_code: int = 200, **extra):
    csrf = signer.csrf_token(request.cookies.get(SESSION_COOKIE, ""))
    context = {
        "upstreams": _upstreams(conn),
        "csrf": csrf,
        "section": "upstreams",
        "iso": views.iso,
        "dialects": [d.value for d in Dialect],
        "proxy_upstream": request.app.state.upstream,
        "default_api_version": DEFAULT_AZURE_API_VERSION,
        "name_rule": NAME_RULE,
        **extra,
    }
    return request.app.state.templates.TemplateResponse(request, "upstreams.html", context, status_code=status_code)


@router.get("/upstreams", response_class=HTMLResponse, dependencies=[AdminPage])
def list_upstreams(
    request: Request,
    conn: Conn,
    signer: Signer,
    done: str | None = None,
    groups: Annotated[int, Query(ge=0)] = 0,
    keys: Annotated[int, Query(ge=0)] = 0,
):
    """Upstreams with their groups: add, edit, enable, disable, delete; add a group."""
    message = DONE.get(done or "")
    if done == "deleted":
        message = f"Upstream deleted, with {groups} group(s) and {keys} key(s)."
    elif done == "group-deleted":
        message = f"Group deleted, with {keys} key(s)."
    return render_upstreams(request, conn, signer, message=message)


@router.get("/api/upstreams", dependencies=[AdminApi])
def list_upstreams_json(conn: Conn) -> dict:
    """Every upstream with its groups (base_url null: the proxy's own upstream, proxy.upstream)."""
    return {"upstreams": _upstreams(conn)}


@router.post("/api/upstreams", dependencies=[AdminApiChange], status_code=201)
def create_upstream_json(new: NewUpstream, conn: WriteConn) -> dict:
    """Add an upstream; it serves nothing until it has a group with keys."""
    _add(conn, new)
    return _upstream(conn, new.name)


@router.get("/api/upstreams/{name}", dependencies=[AdminApi])
def read_upstream_json(name: str, conn: Conn) -> dict:
    """One upstream with its groups."""
    return _upstream(conn, name)


@router.put("/api/upstreams/{name}", dependencies=[AdminApiChange])
def update_upstream_json(name: str, change: UpstreamChange, conn: WriteConn) -> dict:
    """Change base_url, dialect or api_version; returns the upstream."""
    _edit(conn, name, change)
    return _upstream(conn, name)


@router.delete("/api/upstreams/{name}", dependencies=[AdminApiChange])
def delete_upstream_json(name: str, conn: WriteConn) -> dict:
    """Delete an upstream with its groups and their keys; says how many went."""
    return _delete(conn, name)


@router.post("/api/upstreams/{name}/{action}", dependencies=[AdminApiChange])
def change_upstream_json(name: str, action: str, conn: WriteConn) -> dict:
    """enable or disable an upstream (a disabled one serves nothing); returns it."""
    if action not in ("enable", "disable"):
        raise HTTPException(404, f"No upstream action {action!r}; use enable or disable (DELETE to delete).")
    _set_enabled(conn, name, action == "enable")
    return _upstream(conn, name)


@router.post("/upstreams", response_class=HTMLResponse, dependencies=[AdminForm])
def create_upstream(
    request: Request,
    conn: WriteConn,
    signer: Signer,
    name: Annotated[str, Form(max_length=200)] = "",
    base_url: Annotated[str, Form(max_length=2000)] = "",
    dialect: Annotated[str, Form(max_length=20)] = Dialect.OPENAI.value,
    api_version: Annotated[str, Form(max_length=200)] = "",
):
    """Add an upstream from the page, then show it."""
    try:
        new = from_form(NewUpstream, name=name, base_url=base_url, dialect=dialect, api_version=api_version)
        upstream_id = _add(conn, new)
    except HTTPException as e:
        return render_upstreams(request, conn, signer, e.status_code, error=e.detail)
    return RedirectResponse(f"/upstreams?done=added#upstream-{upstream_id}", status_code=303)


@router.post("/upstreams/{name}/edit", response_class=HTMLResponse, dependencies=[AdminForm])
def edit_upstream(
    request: Request,
    name: str,
    conn: WriteConn,
    signer: Signer,
    base_url: Annotated[str, Form(max_length=2000)] = "",
    dialect: Annotated[str, Form(max_length=20)] = Dialect.OPENAI.value,
    api_version: Annotated[str, Form(max_length=200)] = "",
):
    """Save an upstream's base URL (empty: proxy.upstream), dialect and api-version."""
    try:
        upstream_id = _upstream(conn, name)["id"]
        change = from_form(UpstreamChange, base_url=base_url.strip() or None, dialect=dialect, api_version=api_version)
        _edit(conn, name, change)
    except HTTPException as e:
        return render_upstreams(request, conn, signer, e.status_code, error=e.detail)
    return RedirectResponse(f"/upstreams?done=edited#upstream-{upstream_id}", status_code=303)


@router.post("/upstreams/{name}/{action}", response_class=HTMLResponse, dependencies=[AdminForm])
def change_upstream(request: Request, name: str, action: str, conn: WriteConn, signer: Signer):
    """Enable, disable or delete an upstream from the page."""
    if action not in ("enable", "disable", "delete"):
        raise HTTPException(404, f"No upstream action {action!r}.")
    try:
        if action == "delete":
            gone = _delete(conn, name)
            return RedirectResponse(f"/upstreams?done=deleted&groups={gone['groups']}&keys={gone['keys']}", 303)
        upstream_id = _upstream(conn, name)["id"]
        _set_enabled(conn, name, action == "enable")
    except HTTPException as e:
        return render_upstreams(request, conn, signer, e.status_code, error=e.detail)
    return RedirectResponse(f"/upstreams?done={action}d#upstream-{upstream_id}", status_code=303)
