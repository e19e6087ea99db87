"""Upstream keys: the admin page and its JSON API. Values never leave the database; pages show the last four."""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Query
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from core.keys import MAX_NAME_LENGTH
from core.models import KeyState
from monitor_ui import shapes, views
from monitor_ui.deps import AdminApi, AdminApiChange, AdminForm, AdminPage, Conn, KeyStore, PageOf, Settings, WriteConn
from monitor_ui.errors import refused_as_http, sentence
from monitor_ui.names import key_label
from monitor_ui.pages import Page, see_other
from storage import objects, routes, upstream_keys
from usecases import keys as key_admin

router = APIRouter(prefix="/keys", tags=["keys"])
api = APIRouter(prefix="/api/keys", tags=["keys"])

PAGE_SIZE = 100
MAX_BULK_LINES = 10_000
# What a finished action says on the page after its redirect; the query carries only the code and counts.
DONE = {
    "enabled": "enabled",
    "disabled": "disabled",
    "deleted": "deleted",
    "reset": "returned to active",
    "weighted": "re-weighted",
    "edited": "saved",
    "validated": "validated",
}
MALFORMED_SHOWN = 20  # line numbers a bulk add's redirect carries; the count says how many there were


class WeightChange(BaseModel):
    weight: float = Field(gt=0, le=1000, description="share under the weighted strategy (default 1)")


class KeyChange(BaseModel):
    """What PUT /api/keys/{id} may change; fields left out stay as they are."""

    name: str | None = Field(None, max_length=MAX_NAME_LENGTH, description='a label; "" clears it')
    weight: float | None = Field(None, gt=0, le=1000, description="share under the weighted strategy")


class ValidationRequest(BaseModel):
    ids: list[int] = Field(default_factory=list, max_length=10_000, description="keys to probe")
    all: bool = Field(False, description="with no ids: every key that is not disabled")


class KeysToAdd(BaseModel):
    keys: list[str] = Field(max_length=MAX_BULK_LINES, description="one key per item; a Bearer prefix is removed")
    group: str | None = Field(None, max_length=200, description="UPSTREAM/GROUP whose pool they join")
    group_id: int | None = Field(None, ge=1, description="the same, by id (default: default/default)")


def key_summary(row, now: float | None = None, owned: int = 0) -> dict:
    cooling = row["state"] == "cooling" and row["cooldown_until"] is not None
    return {
        "id": row["id"],
        "name": row["name"],
        "key": f"…{row['last4']}",
        "label": key_label(row["id"], row["name"], row["last4"]),
        "state": row["state"],
        "state_reason": row["state_reason"],
        "cooldown_until": row["cooldown_until"],
        # A cooldown that has ended: the key is tried again by the next request (which decides).
        "cooldown_over": cooling and row["cooldown_until"] <= (now or time.time()),
        "weight": row["weight"],
        "group_id": row["group_id"],
        "group": row["group_label"],
        **views.usage(row),
        # Objects it made (files, batches, stored responses...): only it can reach them (key affinity).
        "objects": owned,
    }


def key_page(conn, after: int, group_id: int | None = None) -> dict:
    """A page of keys, every group's or one group's, with the counts per state of the same keys."""
    if group_id is None:
        rows = upstream_keys.list_keys(conn, PAGE_SIZE, after)
        by_state = upstream_keys.count_by_state(conn)
    else:
        rows = upstream_keys.group_keys(conn, group_id, PAGE_SIZE, after)
        by_state = dict.fromkeys(upstream_keys.STATES, 0)
        for state in upstream_keys.group_key_states(conn, group_id).values():
            by_state[state] = by_state.get(state, 0) + 1
    now = time.time()
    owned = objects.counts_by_key(conn)
    return {
        "keys": [key_summary(r, now, owned.get(r["id"], 0)) for r in rows],
        "next_after": rows[-1]["id"] if len(rows) == PAGE_SIZE else None,
        "by_state": by_state,
    }


def group_of(conn, label: str | None, group_id: int | None) -> int | None:
    """The group keys join: by label or id (both must agree), None for default/default; 404 when there is none."""
    with refused_as_http():
        by_label = routes.group_id_of(conn, label) if label else None
        if group_id is not None:
            routes.get_group(conn, group_id)
    if by_label is not None and group_id is not None and by_label != group_id:
        raise HTTPException(422, f"The group {label!r} and group_id {group_id} are different groups: give one.")
    chosen = by_label if by_label is not None else group_id
    if chosen is None:
        try:
            routes.default_group_id(conn)
        except routes.NotFound:
            raise HTTPException(422, "There is no group default/default: name the group the keys join.") from None
    return chosen


def _report(report) -> dict:
    return {"added": report.added, "duplicates": report.duplicates, "malformed_lines": report.malformed}


def _render(page: Page, conn, after: int = 0, group_id: int | None = None, **extra) -> HTMLResponse:
    groups = [views.group_summary(g) for g in routes.list_groups(conn)]
    context = {
        **key_page(conn, after, group_id),
        "section": "keys",
        "iso": views.iso,
        "groups": groups,
        "group_filter": next((g for g in groups if g["id"] == group_id), None),
        **extra,
    }
    return page.render("keys.html", context)


def notice(done: str | None, count: int, duplicates: int, malformed: str, malformed_count: int) -> dict:
    """What the page says after a key action's redirect: a bulk add's report, or one line."""
    if done == "added":  # where a bulk add lands: reloading this page adds nothing
        report = {
            "added": count,
            "duplicates": duplicates,
            "malformed_lines": _line_numbers(malformed),
            "malformed": malformed_count,
        }
        return {"report": report}
    return {"message": f"{count} key(s) {DONE[done]}." if done in DONE else None}


def back_to(back: str, group_id: int | None, query: dict, anchor: str = "") -> RedirectResponse:
    """After a key action: the group page it was made on, or the keys page."""
    page = f"/groups/{group_id}" if back == "group" and group_id is not None else "/keys"
    return see_other(f"{page}?{urlencode(query)}{anchor}")


After = Annotated[int, Query(ge=0, description="continue after this key id (keyset pagination)")]

GroupFilter = Annotated[str | None, Query(max_length=200, description="only this group's keys: id or UPSTREAM/GROUP")]


def _group_filter(conn, value: str | None) -> int | None:
    value = (value or "").strip()
    if not value:
        return None
    with refused_as_http():
        return routes.get_group(conn, int(value))["id"] if value.isdecimal() else routes.group_id_of(conn, value)


def _line_numbers(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.isdecimal()][:MALFORMED_SHOWN]


@router.get("", response_class=HTMLResponse, dependencies=[AdminPage])
def list_keys(
    page: PageOf,
    conn: Conn,
    after: After = 0,
    done: str | None = None,
    count: Annotated[int, Query(ge=0)] = 0,
    duplicates: Annotated[int, Query(ge=0)] = 0,
    malformed: Annotated[str, Query(max_length=200)] = "",
    malformed_count: Annotated[int, Query(ge=0)] = 0,
    group: GroupFilter = None,
):
    """Upstream keys: add in bulk, state, usage, and the actions on them; every group's or one group's."""
    group_id = _group_filter(conn, group)
    extra = notice(done, count, duplicates, malformed, malformed_count)
    return _render(page, conn, after, group_id, **extra)


@api.get("", dependencies=[AdminApi], response_model=shapes.KeyPage)
def list_keys_json(conn: Conn, after: After = 0, group: GroupFilter = None) -> dict:
    """Upstream keys, masked, with state, group and usage; 100 per page; `group` keeps one group's."""
    return key_page(conn, after, _group_filter(conn, group))


@router.post("/add", dependencies=[AdminForm])
def create_keys(
    store: KeyStore,
    keys: Annotated[str, Form(max_length=5_000_000)] = "",
    name: Annotated[str, Form(max_length=MAX_NAME_LENGTH)] = "",
    group_id: Annotated[int | None, Form(ge=1)] = None,
    back: Annotated[str, Form()] = "list",
) -> RedirectResponse:
    """Bulk add from the textarea (KEY or NAME<TAB>KEY lines) to a group, then redirect to the page with the counts."""
    lines = keys.splitlines()[:MAX_BULK_LINES]
    group_id = group_of(store.conn, None, group_id)
    try:
        report = key_admin.add_keys(store, lines, name, group_id)
    except ValueError as e:
        raise HTTPException(422, sentence(e)) from None
    query = {
        "done": "added",
        "count": len(report.added),
        "duplicates": report.duplicates,
        "malformed": ",".join(map(str, report.malformed[:MALFORMED_SHOWN])),
        "malformed_count": len(report.malformed),
    }
    return back_to(back, group_id, query)


@api.post("", dependencies=[AdminApiChange], response_model=shapes.KeysAdded)
def create_keys_json(wanted: KeysToAdd, store: KeyStore) -> dict:
    """Add keys to a group (default default/default): the ids added, duplicates, malformed items (1-based)."""
    group_id = group_of(store.conn, wanted.group, wanted.group_id)
    return _report(key_admin.add_keys(store, wanted.keys, group_id=group_id))


def _change(conn, action: str, ids: list[int]) -> int:
    if action == "delete":
        return upstream_keys.delete_keys(conn, ids)
    state = KeyState.ACTIVE if action == "enable" else KeyState.DISABLED
    return upstream_keys.set_admin_state(conn, ids, state, f"{action}d by admin")


def _key(conn, key_id: int) -> dict:
    row = upstream_keys.get_key(conn, key_id)
    if row is None:
        raise HTTPException(404, f"No upstream key with id {key_id}.")
    return key_summary(row, owned=objects.count_of_key(conn, key_id))


def _edit(conn, key_id: int, name: str | None, weight: float | None) -> None:
    if upstream_keys.get_key(conn, key_id) is None:
        raise HTTPException(404, f"No upstream key with id {key_id}.")
    try:
        if name is not None:
            upstream_keys.rename_key(conn, key_id, name)
    except ValueError as e:
        raise HTTPException(422, f"{str(e)[0].upper()}{str(e)[1:]}.") from None
    if weight is not None:
        upstream_keys.set_weight(conn, [key_id], weight)


@router.get("/{key_id}", response_class=HTMLResponse, dependencies=[AdminPage])
def read_key(page: PageOf, key_id: int, conn: Conn, done: str | None = None):
    """One upstream key: its name and weight to edit, state, usage, and its flows."""
    context = {
        "key": _key(conn, key_id),
        "section": "keys",
        "iso": views.iso,
        "message": "Saved." if done == "edited" else None,
    }
    return page.render("key.html", context)


@api.get("/{key_id}", dependencies=[AdminApi], response_model=shapes.Key)
def read_key_json(key_id: int, conn: Conn) -> dict:
    """One upstream key, masked, with state and usage."""
    return _key(conn, key_id)


@api.put("/{key_id}", dependencies=[AdminApiChange], response_model=shapes.Key)
def update_key_json(key_id: int, change: KeyChange, conn: WriteConn) -> dict:
    """Change a key's name and/or weight; returns the key as GET /api/keys/{id} shows it."""
    _edit(conn, key_id, change.name, change.weight)
    return _key(conn, key_id)


@router.post("/{key_id}/edit", dependencies=[AdminForm])
def edit_key(
    key_id: int,
    conn: WriteConn,
    name: Annotated[str | None, Form(max_length=MAX_NAME_LENGTH)] = None,
    weight: Annotated[float | None, Form(gt=0, le=1000)] = None,
    back: Annotated[str, Form()] = "list",
) -> RedirectResponse:
    """Rename (and re-weight) a key from the keys page, its group's page or its own; back to where the form was."""
    _edit(conn, key_id, name, weight)
    if back == "key":
        return see_other(f"/keys/{key_id}?done=edited")
    return back_to(back, _key(conn, key_id)["group_id"], {"done": "edited", "count": 1}, f"#key-{key_id}")


@router.post("/{key_id}/{action}", dependencies=[AdminForm])
async def change_key(
    key_id: int, action: str, store: KeyStore, settings: Settings, back: Annotated[str, Form()] = "list"
) -> RedirectResponse:
    """Enable, disable, delete or validate one key from the keys page or its group's page."""
    conn = store.conn
    row = upstream_keys.get_key(conn, key_id)
    group_id = row["group_id"] if row is not None else None
    if action == "validate":
        results = await key_admin.validate_keys(store, routes.groups_by_id(conn), settings.upstream, [key_id])
        return back_to(back, group_id, {"done": "validated", "count": len(results)}, f"#key-{key_id}")
    if action not in ("enable", "disable", "delete"):
        raise HTTPException(404, f"No key action {action!r}.")
    count = _change(conn, action, [key_id])
    return back_to(back, group_id, {"done": f"{action}d", "count": count})


@api.post("/{key_id}/weight", dependencies=[AdminApiChange], response_model=shapes.KeyWeight)
def update_key_weight_json(key_id: int, change: WeightChange, conn: WriteConn) -> dict:
    """Set one key's weight; the proxy uses it within a second."""
    if not upstream_keys.set_weight(conn, [key_id], change.weight):
        raise HTTPException(404, f"No upstream key with id {key_id}.")
    return {"id": key_id, "weight": change.weight}


@api.post(
    "/{key_id}/{action}",
    dependencies=[AdminApiChange],
    response_model=shapes.KeyChanged,
    response_model_exclude_unset=True,
)
def change_key_json(key_id: int, action: str, conn: WriteConn) -> dict:
    """enable, disable or delete one key; the proxy applies it within a second."""
    if action not in ("enable", "disable", "delete"):
        raise HTTPException(404, f"No key action {action!r}; use enable, disable, delete, weight or validate.")
    owned = objects.count_of_key(conn, key_id) if action in ("disable", "delete") else 0
    if not _change(conn, action, [key_id]):
        raise HTTPException(404, f"No upstream key with id {key_id}.")
    if owned:
        # Requests for those objects now get 409 object_owner_unavailable: say so.
        return {"id": key_id, "done": action, "owned_objects": owned, "warning": ownership_warning(owned)}
    return {"id": key_id, "done": action}


def ownership_warning(owned: int) -> str:
    return (
        f"This key owns {owned} object(s) (files, batches, stored responses, vector stores...) that no other"
        " key can reach: requests for them get 409 object_owner_unavailable while it is disabled or deleted."
    )


@router.post("/reset-invalid", dependencies=[AdminForm])
def reset_invalid_keys(conn: WriteConn) -> RedirectResponse:
    """Every invalid key back to active (they are tried, and marked again if still refused)."""
    ids = upstream_keys.ids_in_state(conn, [KeyState.INVALID])
    count = upstream_keys.set_admin_state(conn, ids, KeyState.ACTIVE, "reset by admin")
    return see_other(f"/keys?done=reset&count={count}")


@api.post("/reset", dependencies=[AdminApiChange], response_model=shapes.KeysReset)
def reset_keys_json(conn: WriteConn, states: Annotated[list[str], Query()] = ["invalid"]) -> dict:  # noqa: B006
    """Keys in these states (default: invalid) back to active."""
    unknown = set(states) - {"invalid", "exhausted", "cooling"}
    if unknown:
        raise HTTPException(422, f"Only invalid, exhausted and cooling keys can be reset, not {sorted(unknown)}.")
    ids = upstream_keys.ids_in_state(conn, states)
    return {"reset": upstream_keys.set_admin_state(conn, ids, KeyState.ACTIVE, "reset by admin")}


@router.post("/validate", response_class=HTMLResponse, dependencies=[AdminForm])
async def validate_keys(page: PageOf, store: KeyStore, settings: Settings):
    """Probe every invalid and exhausted key; the page lists each result."""
    ids = key_admin.ids_to_validate(store, None, False)
    results = await key_admin.validate_keys(store, routes.groups_by_id(store.conn), settings.upstream, ids)
    return _render(page, store.conn, validations=[r.as_dict() for r in results])


@api.post("/validate", dependencies=[AdminApiChange], response_model=shapes.Validations)
async def validate_keys_json(wanted: ValidationRequest, store: KeyStore, settings: Settings) -> dict:
    """Probe keys with GET /v1/models (no tokens spent); by default every invalid or exhausted one."""
    ids = key_admin.ids_to_validate(store, wanted.ids, wanted.all)
    results = await key_admin.validate_keys(store, routes.groups_by_id(store.conn), settings.upstream, ids)
    return {"results": [r.as_dict() for r in results], "skipped": sorted(set(ids) - {r.key_id for r in results})}
