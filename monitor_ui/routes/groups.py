"""Groups: one group's page (its keys, its models, priority and weight) and the JSON API of every group.

A group belongs to an upstream and has its own key pool and model list; an empty list
serves every model. Changes bump the routes revision, so running proxies follow within a
second.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from core.models import KeyState
from monitor_ui import shapes, views
from monitor_ui.deps import AdminApi, AdminApiChange, AdminForm, AdminPage, Conn, KeyStore, PageOf, Settings, WriteConn
from monitor_ui.errors import enabling, refused_as_http, sentence
from monitor_ui.fields import NAME_RULE, Model, Name, OptionalModel, from_form
from monitor_ui.pages import Page, done_or_refused, see_other
from monitor_ui.routes.keys import key_page, notice
from monitor_ui.routes.upstreams import shown_again
from storage import routes, upstream_keys
from storage.upstream_keys import SqliteKeyStore
from usecases import keys as key_admin
from usecases import models as model_admin

router = APIRouter(prefix="/groups", tags=["groups"])
api = APIRouter(prefix="/api/groups", tags=["groups"])

# What the group page says after its own actions' redirects (key actions use the keys page's codes).
DONE = {
    "group-added": "Group added: give it keys below, and models (or leave the list empty to serve every model).",
    "group-edited": "Group saved.",
    "group-enabled": "Group enabled.",
    "group-disabled": "Group disabled: it serves nothing until it is enabled.",
    "model-saved": "Model saved.",
    "model-deleted": "Model removed from this group.",
}
USABLE = (KeyState.ACTIVE, KeyState.COOLING)
Weight = Annotated[float, Field(gt=0, le=1000, description="share within its priority (default 1)")]
Priority = Annotated[int, Field(ge=-1_000_000, le=1_000_000, description="higher is tried first (default 0)")]


class NewGroup(BaseModel):
    upstream: str = Field(max_length=200, description="the upstream's name")
    name: Name = Field(description=NAME_RULE)
    priority: Priority = 0
    weight: Weight = 1.0


class GroupChange(BaseModel):
    """What PUT /api/groups/{id} may change; fields left out stay as they are."""

    priority: Priority | None = None
    weight: Weight | None = None


class ModelToServe(BaseModel):
    model: Model = Field(description="the name clients ask for")
    upstream_model: OptionalModel = Field(None, description="the name upstream uses (an Azure deployment)")


def _group_row(conn, group_id: int):
    with refused_as_http():
        return routes.get_group(conn, group_id)


def group_detail(conn, group_id: int, after: int = 0) -> dict:
    """A group with its upstream, its models and a page of its keys (the page and GET /api/groups/{id})."""
    row = _group_row(conn, group_id)
    keys = key_page(conn, after, group_id)
    return {
        **views.group_summary(row),
        "base_url": row["base_url"],
        "api_version": row["api_version"],
        "model_list": [
            {"model": m["model"], "upstream_model": m["upstream_model"], "source": m["source"]}
            for m in routes.list_models(conn, group_id)
        ],
        "key_list": keys["keys"],
        "next_after": keys["next_after"],
        "by_state": keys["by_state"],
    }


def _add(conn, new: NewGroup) -> int:
    with refused_as_http():
        routes.get_upstream(conn, new.upstream)
        return routes.add_group(conn, f"{new.upstream}/{new.name}", new.priority, new.weight)


def _edit(conn, group_id: int, change: GroupChange) -> None:
    _group_row(conn, group_id)
    with refused_as_http():
        routes.update_group(conn, group_id, priority=change.priority, weight=change.weight)


def _set_enabled(conn, group_id: int, enabled: bool) -> None:
    with refused_as_http():
        routes.set_group_enabled(conn, group_id, enabled)


def _delete(conn, group_id: int) -> dict:
    label = _group_row(conn, group_id)["label"]
    with refused_as_http():
        keys = routes.delete_group(conn, group_id)
    return {"id": group_id, "label": label, "deleted": True, "keys": keys}


def _serve(conn, group_id: int, wanted: ModelToServe) -> None:
    _group_row(conn, group_id)
    with refused_as_http():
        routes.add_model(conn, group_id, wanted.model, wanted.upstream_model)


def _stop_serving(conn, group_id: int, model: str) -> None:
    label = _group_row(conn, group_id)["label"]
    if not any(m["model"] == model for m in routes.list_models(conn, group_id)):
        raise HTTPException(404, f"Group {label} has no model {model!r}.")
    with refused_as_http():
        routes.delete_model(conn, group_id, model)


async def _refresh(store: SqliteKeyStore, upstream: str, group_id: int) -> dict:
    """GET /v1/models at the group's upstream with one of its keys; 409 without a usable key, 502 on no list."""
    conn = store.conn
    label = _group_row(conn, group_id)["label"]
    if not any(state in USABLE for state in upstream_keys.group_key_states(conn, group_id).values()):
        raise HTTPException(409, f"{label} has no usable key (active or cooling) to ask upstream with.")
    group = routes.groups_by_id(conn)[group_id]
    [result] = await model_admin.refresh_models(store, routes.SqliteRouteStore(conn), [group], upstream)
    if result.error:
        raise HTTPException(502, sentence(f"the models of {label} were not refreshed: {result.error}"))
    return result.as_dict()


def _render(page: Page, conn, group_id: int, after: int = 0, status_code: int = 200, **extra) -> HTMLResponse:
    context = {"group": group_detail(conn, group_id, after), "section": "upstreams", "iso": views.iso, **extra}
    return page.render("group.html", context, status_code)


def _shown_again(page: Page, conn, group_id: int):
    """The group's page with a form's refusal (for done_or_refused)."""
    return partial(_render, page, conn, group_id, 0)


# --------------------------------------------------------------------------- the JSON API


@api.get("", dependencies=[AdminApi], response_model=shapes.GroupList)
def list_groups_json(conn: Conn) -> dict:
    """Every group, highest priority first, with its counts of keys and models (0 models: serves every model)."""
    return {"groups": [views.group_summary(row) for row in routes.list_groups(conn)]}


@api.post("", dependencies=[AdminApiChange], status_code=201, response_model=shapes.GroupDetail)
def create_group_json(new: NewGroup, conn: WriteConn) -> dict:
    """Add a group to an upstream; returns it as GET /api/groups/{id} does."""
    return group_detail(conn, _add(conn, new))


@api.get("/{group_id}", dependencies=[AdminApi], response_model=shapes.GroupDetail)
def read_group_json(group_id: int, conn: Conn, after: Annotated[int, Query(ge=0)] = 0) -> dict:
    """One group: its upstream, its models and 100 of its keys (after=ID for the next 100)."""
    return group_detail(conn, group_id, after)


@api.put("/{group_id}", dependencies=[AdminApiChange], response_model=shapes.GroupDetail)
def update_group_json(group_id: int, change: GroupChange, conn: WriteConn) -> dict:
    """Change a group's priority and/or weight; returns the group."""
    _edit(conn, group_id, change)
    return group_detail(conn, group_id)


@api.delete("/{group_id}", dependencies=[AdminApiChange], response_model=shapes.GroupDeleted)
def delete_group_json(group_id: int, conn: WriteConn) -> dict:
    """Delete a group with its keys and model list; says how many keys went."""
    return _delete(conn, group_id)


@api.post("/{group_id}/models", dependencies=[AdminApiChange], response_model=shapes.GroupDetail)
def add_model_json(group_id: int, wanted: ModelToServe, conn: WriteConn) -> dict:
    """Serve a model from this group (again: change its upstream name); returns the group."""
    _serve(conn, group_id, wanted)
    return group_detail(conn, group_id)


@api.post("/{group_id}/models/refresh", dependencies=[AdminApiChange], response_model=shapes.ModelsRefreshed)
async def refresh_models_json(group_id: int, store: KeyStore, settings: Settings) -> dict:
    """Replace what the last refresh found with upstream's GET /v1/models; models added by hand stay."""
    return await _refresh(store, settings.upstream, group_id)


@api.delete("/{group_id}/models/{model:path}", dependencies=[AdminApiChange], response_model=shapes.GroupDetail)
def delete_model_json(group_id: int, model: str, conn: WriteConn) -> dict:
    """Stop serving a model from this group; returns the group."""
    _stop_serving(conn, group_id, model)
    return group_detail(conn, group_id)


@api.post("/{group_id}/{action}", dependencies=[AdminApiChange], response_model=shapes.GroupDetail)
def change_group_json(group_id: int, action: str, conn: WriteConn) -> dict:
    """enable or disable a group; returns it."""
    _set_enabled(conn, group_id, enabling(action, "group"))
    return group_detail(conn, group_id)


# --------------------------------------------------------------------------- the pages


@router.get("", include_in_schema=False, dependencies=[AdminPage])
def list_groups() -> RedirectResponse:
    """Groups are listed under their upstreams."""
    return see_other("/upstreams")


@router.post("", response_class=HTMLResponse, dependencies=[AdminForm])
def create_group(
    page: PageOf,
    conn: WriteConn,
    settings: Settings,
    upstream: Annotated[str, Form(max_length=200)] = "",
    name: Annotated[str, Form(max_length=200)] = "",
    priority: Annotated[str, Form(max_length=20)] = "0",
    weight: Annotated[str, Form(max_length=20)] = "1",
) -> Response:
    """Add a group from the upstreams page, then show its page."""

    def add() -> str:
        new = from_form(NewGroup, upstream=upstream, name=name, priority=priority or 0, weight=weight or 1)
        return f"/groups/{_add(conn, new)}?done=group-added"

    return done_or_refused(add, shown_again(page, conn, settings))


@router.get("/{group_id}", response_class=HTMLResponse, dependencies=[AdminPage])
def read_group(
    page: PageOf,
    group_id: int,
    conn: Conn,
    after: Annotated[int, Query(ge=0)] = 0,
    done: str | None = None,
    count: Annotated[int, Query(ge=0)] = 0,
    duplicates: Annotated[int, Query(ge=0)] = 0,
    malformed: Annotated[str, Query(max_length=200)] = "",
    malformed_count: Annotated[int, Query(ge=0)] = 0,
):
    """One group: its keys with their actions, its models (refresh, add, rename, delete), priority and weight."""
    extra: dict[str, Any]
    if done in DONE:
        extra = {"message": DONE[done]}
    else:  # a key action's redirect
        extra = notice(done, count, duplicates, malformed, malformed_count)
    return _render(page, conn, group_id, after, **extra)


@router.post("/{group_id}/edit", response_class=HTMLResponse, dependencies=[AdminForm])
def edit_group(
    page: PageOf,
    group_id: int,
    conn: WriteConn,
    priority: Annotated[str, Form(max_length=20)] = "",
    weight: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    """Save a group's priority and weight."""

    def edit() -> str:
        _edit(conn, group_id, from_form(GroupChange, priority=priority or None, weight=weight or None))
        return f"/groups/{group_id}?done=group-edited"

    return done_or_refused(edit, _shown_again(page, conn, group_id), missing_raises=True)


@router.post("/{group_id}/models/add", response_class=HTMLResponse, dependencies=[AdminForm])
def add_model(
    page: PageOf,
    group_id: int,
    conn: WriteConn,
    model: Annotated[str, Form(max_length=1000)] = "",
    upstream_model: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Serve a model from this group, or change the upstream name of one it serves."""

    def serve() -> str:
        _serve(conn, group_id, from_form(ModelToServe, model=model, upstream_model=upstream_model))
        return f"/groups/{group_id}?done=model-saved#models"

    return done_or_refused(serve, _shown_again(page, conn, group_id), missing_raises=True)


@router.post("/{group_id}/models/delete", dependencies=[AdminForm])
def delete_model(group_id: int, conn: WriteConn, model: Annotated[str, Form(max_length=1000)] = "") -> RedirectResponse:
    """Stop serving a model from this group."""
    _stop_serving(conn, group_id, model)
    return see_other(f"/groups/{group_id}?done=model-deleted#models")


@router.post("/{group_id}/models/refresh", response_class=HTMLResponse, dependencies=[AdminForm])
async def refresh_models(page: PageOf, group_id: int, store: KeyStore, settings: Settings):
    """Ask upstream for the group's models with one of its keys; the page says what changed."""
    try:
        result = await _refresh(store, settings.upstream, group_id)
    except HTTPException as e:
        if e.status_code == 404:
            raise
        return _render(page, store.conn, group_id, status_code=e.status_code, error=e.detail)
    return _render(page, store.conn, group_id, refreshed=result)


@router.post("/{group_id}/keys/validate", response_class=HTMLResponse, dependencies=[AdminForm])
async def validate_group_keys(page: PageOf, group_id: int, store: KeyStore, settings: Settings):
    """Probe this group's invalid and exhausted keys; the page lists each result."""
    conn = store.conn
    _group_row(conn, group_id)
    mine = upstream_keys.group_key_states(conn, group_id)
    ids = [i for i in key_admin.ids_to_validate(store, None, False) if i in mine]
    results = await key_admin.validate_keys(store, routes.groups_by_id(conn), settings.upstream, ids)
    return _render(page, conn, group_id, validations=[r.as_dict() for r in results])


@router.post("/{group_id}/keys/reset-invalid", dependencies=[AdminForm])
def reset_invalid_group_keys(group_id: int, conn: WriteConn) -> RedirectResponse:
    """This group's invalid keys back to active."""
    _group_row(conn, group_id)
    ids = [i for i, state in upstream_keys.group_key_states(conn, group_id).items() if state == KeyState.INVALID]
    count = upstream_keys.set_admin_state(conn, ids, KeyState.ACTIVE, "reset by admin")
    return see_other(f"/groups/{group_id}?done=reset&count={count}")


@router.post("/{group_id}/{action}", dependencies=[AdminForm])
def change_group(group_id: int, action: str, conn: WriteConn) -> RedirectResponse:
    """Enable, disable or delete a group from its page."""
    if action == "delete":
        gone = _delete(conn, group_id)
        return see_other(f"/upstreams?done=group-deleted&keys={gone['keys']}")
    if action not in ("enable", "disable"):
        raise HTTPException(404, f"No group action {action!r}.")
    _set_enabled(conn, group_id, action == "enable")
    return see_other(f"/groups/{group_id}?done=group-{action}d")
