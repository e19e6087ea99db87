"""Trace probes (docs/traces.md): who fetches the image a request through a group names; pages and JSON twins.

Every path needs the admin credential. The image itself is served by the trace listener
(monitor_ui/trace_listener.py) on its own port, never by this app.
"""

from __future__ import annotations

import sqlite3
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from config import Settings as AllSettings
from monitor_ui import tracer, views
from monitor_ui.deps import AdminApi, AdminApiChange, AdminForm, AdminPage, Config, Conn, PageOf, WriteConn
from monitor_ui.pages import see_other
from storage import routes
from storage import traces as trace_store

router = APIRouter(prefix="/traces", tags=["traces"])
api = APIRouter(prefix="/api/traces", tags=["traces"])
Limit = Annotated[int, Query(ge=1, le=trace_store.PAGE_LIMIT)]


class TraceFetcher(BaseModel):
    address: str
    user_agents: list[str]
    fetches: int
    first_delay_seconds: float | None


class TraceVerdict(BaseModel):
    state: str = Field(description='"pending", "no fetch" or "fetched"')
    summary: str
    addresses: int = Field(description="distinct addresses that fetched the image")
    fetchers: list[TraceFetcher]
    mentions_image: bool | None = Field(description="whether the answer mentions the image (a word heuristic)")
    model: str | None = Field(description="the model the answer names")
    system_fingerprint: str | None
    model_differs: bool = Field(description="the answer names another model than the one asked for")


class TraceFetch(BaseModel):
    at: float
    address: str
    user_agent: str | None
    headers: list[list[str]]
    delay_seconds: float | None = Field(description="seconds after the trace's request was sent")


class Trace(BaseModel):
    id: int
    group: str
    group_id: int | None
    model: str
    created_at: float
    sent_at: float | None
    answered_at: float | None
    finished_at: float | None
    status: int | None = Field(description="the proxy's HTTP status for the trace's request (0: no answer)")
    answer_model: str | None
    system_fingerprint: str | None
    answer_text: str | None
    error: str | None
    flow_id: int | None
    scheduled: bool
    image_url: str | None
    verdict: TraceVerdict
    fetches: list[TraceFetch]


class TraceList(BaseModel):
    traces: list[Trace]


class TraceDeleted(BaseModel):
    deleted: int = Field(description="the id of the trace deleted, with its fetches")


class NewTrace(BaseModel):
    group: str | int = Field(description="UPSTREAM/GROUP, or the group's id")
    model: str = Field(min_length=1, max_length=200)


def _listing(
    conn: sqlite3.Connection, settings: AllSettings, group: str | None, model: str | None, limit: int
) -> list[dict]:
    try:
        group_id = routes.group_id_of(conn, group) if group else None
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    except routes.NotFound as e:
        raise HTTPException(404, str(e)) from None
    rows = trace_store.listing(conn, group_id=group_id, model=model, limit=limit)
    return [tracer.described(conn, row, settings) for row in rows]


def _one(conn: sqlite3.Connection, settings: AllSettings, trace_id: int) -> dict:
    row = trace_store.get(conn, trace_id)
    if row is None:
        raise HTTPException(404, f"No trace #{trace_id}.")
    return tracer.described(conn, row, settings)


def _start(conn: sqlite3.Connection, settings: AllSettings, group: str | int, model: str) -> dict:
    """A new trace, running in the UI's loop; refused with a clear 4xx when it cannot run."""
    try:
        trace, client_id = tracer.start(conn, settings, group, model)
    except tracer.TracesOff as e:
        raise HTTPException(409, str(e)) from None
    except routes.NotFound as e:
        raise HTTPException(404, str(e)) from None
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    tracer.run_in_background(settings, trace, client_id)
    return trace


GroupFilter = Annotated[str | None, Query(max_length=300, description="UPSTREAM/GROUP")]
ModelFilter = Annotated[str | None, Query(max_length=200)]


@api.get("", dependencies=[AdminApi], response_model=TraceList)
def list_traces_json(
    conn: Conn, settings: Config, group: GroupFilter = None, model: ModelFilter = None, limit: Limit = 100
):
    """Traces newest first, of one group or model if asked, each with its verdict and fetches."""
    return {"traces": _listing(conn, settings, group, model, limit)}


@api.get("/model/{model:path}", dependencies=[AdminApi], response_model=TraceList)
def list_model_traces_json(conn: Conn, settings: Config, model: str, limit: Limit = 100):
    """The traces of one model, newest first."""
    return {"traces": _listing(conn, settings, None, model, limit)}


@api.get("/{trace_id}", dependencies=[AdminApi], response_model=Trace)
def read_trace_json(conn: Conn, settings: Config, trace_id: int):
    """One trace: its request, answer, every fetch of its image (headers included) and its verdict."""
    return _one(conn, settings, trace_id)


@api.post("", dependencies=[AdminApiChange], response_model=Trace, status_code=202)
async def create_trace_json(conn: WriteConn, settings: Config, new: NewTrace):
    """Start a trace of `model` through `group`; it runs in the background: read it until `finished_at` is
    set (after the answer and trace.grace_seconds); then its verdict stands."""
    trace = _start(conn, settings, new.group, new.model)
    return _one(conn, settings, int(trace["id"]))


@api.delete("/{trace_id}", dependencies=[AdminApiChange], response_model=TraceDeleted)
def delete_trace_json(conn: WriteConn, trace_id: int) -> dict:
    """Delete a trace and the fetches recorded for it."""
    if not trace_store.delete(conn, trace_id):
        raise HTTPException(404, f"No trace #{trace_id}.")
    return {"deleted": trace_id}


@router.get("", response_class=HTMLResponse, dependencies=[AdminPage])
def list_traces(
    page: PageOf, conn: Conn, settings: Config, group: GroupFilter = None, model: ModelFilter = None, limit: Limit = 100
):
    """Traces newest first, a group's or a model's, and a form to run one."""
    shown = _listing(conn, settings, group, model, limit)
    context = {
        "traces": shown,
        "groups": sorted(routes.group_labels(conn).values()),
        "raw": {"group": group or "", "model": model or ""},
        "enabled": bool(settings.trace.port),
        "section": "traces",
        "iso": views.iso,
    }
    return page.render("traces.html", context)


@router.get("/{trace_id}", response_class=HTMLResponse, dependencies=[AdminPage])
def read_trace(page: PageOf, conn: Conn, settings: Config, trace_id: int):
    """One trace: verdict, fetchers, every fetch with its headers, the answer."""
    return page.render("trace.html", {"t": _one(conn, settings, trace_id), "section": "traces", "iso": views.iso})


@router.post("", response_class=HTMLResponse, dependencies=[AdminForm])
async def create_trace(
    conn: WriteConn,
    settings: Config,
    group: Annotated[str, Form(max_length=300)] = "",
    model: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Run a trace from the page, then show it."""
    trace = _start(conn, settings, group, model)
    return see_other(f"/traces/{trace['id']}")


@router.post("/{trace_id}/delete", response_class=HTMLResponse, dependencies=[AdminForm])
def delete_trace(conn: WriteConn, trace_id: int) -> Response:
    """Delete a trace from its page."""
    if not trace_store.delete(conn, trace_id):
        raise HTTPException(404, f"No trace #{trace_id}.")
    return see_other("/traces")
