"""Upstreams (OpenAI, Azure resources, relay stations) with their groups: the admin page and its JSON API.

Every change goes through storage.routes, which bumps the routes revision: running proxies
rebuild their route table within a second.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from core.dialects import DEFAULT_AZURE_API_VERSION
from core.routing import Dialect
from monitor_ui import shapes, views
from monitor_ui.deps import (
    AdminApi,
    AdminApiChange,
    AdminForm,
    AdminPage,
    Conn,
    PageOf,
    Settings,
    UiSettings,
    WriteConn,
)
from monitor_ui.errors import enabling, refused_as_http
from monitor_ui.fields import NAME_RULE, ApiVersion, BaseUrl, Name, from_form
from monitor_ui.pages import Page, done_or_refused
from storage import routes

router = APIRouter(prefix="/upstreams", tags=["upstreams"])
api = APIRouter(prefix="/api/upstreams", tags=["upstreams"])

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


def render_upstreams(page: Page, conn, settings: UiSettings, status_code: int = 200, **extra) -> HTMLResponse:
    """The upstreams page (the group form posts there too): with `error`, a form's refusal shown again."""
    context = {
        "upstreams": _upstreams(conn),
        "section": "upstreams",
        "iso": views.iso,
        "dialects": [d.value for d in Dialect],
        "proxy_upstream": settings.upstream,
        "default_api_version": DEFAULT_AZURE_API_VERSION,
        "name_rule": NAME_RULE,
        **extra,
    }
    return page.render("upstreams.html", context, status_code)


def shown_again(page: Page, conn, settings: UiSettings):
    """The upstreams page with a form's refusal (for done_or_refused)."""
    return partial(render_upstreams, page, conn, settings)


@router.get("", response_class=HTMLResponse, dependencies=[AdminPage])
def list_upstreams(
    page: PageOf,
    conn: Conn,
    settings: Settings,
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
    return render_upstreams(page, conn, settings, message=message)


@api.get("", dependencies=[AdminApi], response_model=shapes.UpstreamList)
def list_upstreams_json(conn: Conn) -> dict:
    """Every upstream with its groups (base_url null: the proxy's own upstream, proxy.upstream)."""
    return {"upstreams": _upstreams(conn)}


@api.post("", dependencies=[AdminApiChange], status_code=201, response_model=shapes.Upstream)
def create_upstream_json(new: NewUpstream, conn: WriteConn) -> dict:
    """Add an upstream; it serves nothing until it has a group with keys."""
    _add(conn, new)
    return _upstream(conn, new.name)


@api.get("/{name}", dependencies=[AdminApi], response_model=shapes.Upstream)
def read_upstream_json(name: str, conn: Conn) -> dict:
    """One upstream with its groups."""
    return _upstream(conn, name)


@api.put("/{name}", dependencies=[AdminApiChange], response_model=shapes.Upstream)
def update_upstream_json(name: str, change: UpstreamChange, conn: WriteConn) -> dict:
    """Change base_url, dialect or api_version; returns the upstream."""
    _edit(conn, name, change)
    return _upstream(conn, name)


@api.delete("/{name}", dependencies=[AdminApiChange], response_model=shapes.UpstreamDeleted)
def delete_upstream_json(name: str, conn: WriteConn) -> dict:
    """Delete an upstream with its groups and their keys; says how many went."""
    return _delete(conn, name)


@api.post("/{name}/{action}", dependencies=[AdminApiChange], response_model=shapes.Upstream)
def change_upstream_json(name: str, action: str, conn: WriteConn) -> dict:
    """enable or disable an upstream (a disabled one serves nothing); returns it."""
    _set_enabled(conn, name, enabling(action, "upstream"))
    return _upstream(conn, name)


@router.post("", response_class=HTMLResponse, dependencies=[AdminForm])
def create_upstream(
    page: PageOf,
    conn: WriteConn,
    settings: Settings,
    name: Annotated[str, Form(max_length=200)] = "",
    base_url: Annotated[str, Form(max_length=2000)] = "",
    dialect: Annotated[str, Form(max_length=20)] = Dialect.OPENAI.value,
    api_version: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Add an upstream from the page, then show it."""

    def add() -> str:
        new = from_form(NewUpstream, name=name, base_url=base_url, dialect=dialect, api_version=api_version)
        return f"/upstreams?done=added#upstream-{_add(conn, new)}"

    return done_or_refused(add, shown_again(page, conn, settings))


@router.post("/{name}/edit", response_class=HTMLResponse, dependencies=[AdminForm])
def edit_upstream(
    page: PageOf,
    name: str,
    conn: WriteConn,
    settings: Settings,
    base_url: Annotated[str, Form(max_length=2000)] = "",
    dialect: Annotated[str, Form(max_length=20)] = Dialect.OPENAI.value,
    api_version: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Save an upstream's base URL (empty: proxy.upstream), dialect and api-version."""

    def edit() -> str:
        upstream_id = _upstream(conn, name)["id"]
        change = from_form(UpstreamChange, base_url=base_url.strip() or None, dialect=dialect, api_version=api_version)
        _edit(conn, name, change)
        return f"/upstreams?done=edited#upstream-{upstream_id}"

    return done_or_refused(edit, shown_again(page, conn, settings))


@router.post("/{name}/{action}", response_class=HTMLResponse, dependencies=[AdminForm])
def change_upstream(page: PageOf, name: str, action: str, conn: WriteConn, settings: Settings) -> Response:
    """Enable, disable or delete an upstream from the page."""
    if action not in ("enable", "disable", "delete"):
        raise HTTPException(404, f"No upstream action {action!r}.")

    def change() -> str:
        if action == "delete":
            gone = _delete(conn, name)
            return f"/upstreams?done=deleted&groups={gone['groups']}&keys={gone['keys']}"
        upstream_id = _upstream(conn, name)["id"]
        _set_enabled(conn, name, action == "enable")
        return f"/upstreams?done={action}d#upstream-{upstream_id}"

    return done_or_refused(change, shown_again(page, conn, settings))
