"""Replay and compare (docs/workbench.md): send any flow again, compare two flows, replay a search in batch."""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from monitor_ui import shapes
from monitor_ui.deps import AdminApi, AdminApiChange, AdminForm, AdminPage, Conn, PageOf, Settings, WriteConn
from monitor_ui.filters import Flows
from monitor_ui.names import route_names
from monitor_ui.pages import see_other
from monitor_ui.replays import MAX_BATCH, MAX_CONCURRENCY, Asked, ReplayJobs, ReplayRefused, compare, replay
from storage import audit, flows

router = APIRouter(prefix="/flows", tags=["workbench"])
api = APIRouter(prefix="/api/flows", tags=["workbench"])

FlowId = Annotated[int, Query(ge=1)]


class ReplayAsk(BaseModel):
    """What to change in a replay; everything left out is as the original flow had it."""

    group: str | int | None = Field(None, description="UPSTREAM/GROUP label or id: only that group serves it")
    key: int | None = Field(None, ge=1, description="upstream key id: only that key serves it")
    model: str | None = Field(None, max_length=200, description="another model (the body's top-level model)")
    body: str | dict[str, Any] | None = Field(None, description="the body to send instead (JSON text or object)")
    client: str | int | None = Field(None, description="run as this client (name or id); default: the flow's")


class BatchAsk(BaseModel):
    """A batch replay of the flows the query parameters select (the flows page's filters), or of `ids`."""

    ids: list[int] | None = Field(None, max_length=MAX_BATCH, description="these flows instead of a search")
    group: str | int | None = None
    model: str | None = Field(None, max_length=200)
    client: str | int | None = None
    concurrency: int = Field(4, ge=1, le=MAX_CONCURRENCY)
    limit: int = Field(100, ge=1, le=MAX_BATCH, description="at most this many flows of the search, newest first")


def _asked(ask: ReplayAsk | BatchAsk) -> Asked:
    body = getattr(ask, "body", None)
    if isinstance(body, dict):
        body = json.dumps(body, ensure_ascii=False)
    return Asked(
        group=str(ask.group) if ask.group not in (None, "") else None,
        key=getattr(ask, "key", None),
        model=ask.model or None,
        body=body,
        client=str(ask.client) if ask.client not in (None, "") else None,
    )


def _jobs(request: Request) -> ReplayJobs:
    jobs = getattr(request.app.state, "replay_jobs", None)
    if jobs is None:
        jobs = request.app.state.replay_jobs = ReplayJobs()
    return jobs


async def _replay(settings, flow_row_id: int, asked: Asked) -> dict[str, Any]:
    try:
        replayed = await replay(settings, flow_row_id, asked)
    except ReplayRefused as e:
        raise HTTPException(e.status, e.message) from None
    except (OSError, httpx.HTTPError) as e:  # the proxy is not listening, or hung up
        raise HTTPException(502, f"The proxy did not answer the replay ({type(e).__name__}): is it running?") from None
    return replayed.__dict__


@api.post("/{flow_row_id}/replay", dependencies=[AdminApiChange], response_model=shapes.Replayed)
async def replay_flow_json(flow_row_id: int, settings: Settings, ask: Annotated[ReplayAsk | None, Body()] = None):
    """Send a flow again through the proxy, with optional changes; answers the new flow's id once it is recorded."""
    return await _replay(settings, flow_row_id, _asked(ask or ReplayAsk()))


@router.post("/{flow_row_id}/replay", dependencies=[AdminForm])
async def replay_flow(request: Request, flow_row_id: int, settings: Settings):
    """The flow page's "send again" form: the new flow's page once it is recorded."""
    form = await request.form()
    key = str(form.get("key") or "").strip()
    if key and not key.isdecimal():
        raise HTTPException(422, "key must be an upstream key id.")
    asked = Asked(
        group=str(form.get("group") or "").strip() or None,
        key=int(key) if key else None,
        model=str(form.get("model") or "").strip() or None,
        body=str(form["body"]) if form.get("edit_body") and form.get("body") is not None else None,
        client=str(form.get("client") or "").strip() or None,
    )
    replayed = await _replay(settings, flow_row_id, asked)
    if replayed["id"] is None:
        raise HTTPException(504, f"The replay was answered {replayed['status']} but not recorded in time.")
    return see_other(f"/flows/{replayed['id']}")


def _comparison(conn, a: int, b: int) -> dict[str, Any]:
    row_a, row_b = flows.get_flow(conn, a), flows.get_flow(conn, b)
    if row_a is None or row_b is None:
        raise HTTPException(404, f"No flow with id {a if row_a is None else b}.")
    return compare(row_a, row_b)


@api.get("/compare", dependencies=[AdminApi], response_model=shapes.Comparison)
def compare_flows_json(conn: Conn, a: FlowId, b: FlowId) -> dict[str, Any]:
    """Two flows side by side: facts, header and JSON body changes, the word diff of their answers."""
    return _comparison(conn, a, b)


@router.get("/compare", response_class=HTMLResponse, dependencies=[AdminPage])
def compare_flows(page: PageOf, conn: Conn, a: FlowId, b: FlowId):
    """The compare page."""
    return page.render("compare.html", {"cmp": _comparison(conn, a, b), "section": "flows"})


def _batch_ids(conn, query: Flows, ask: BatchAsk) -> list[int]:
    if ask.ids:
        return list(dict.fromkeys(ask.ids))[:MAX_BATCH]
    rows = flows.search_flows(conn, query.filter, ask.limit, columns="id")
    return [r["id"] for r in rows]


def _start(request: Request, conn, write: Any, settings, query: Flows, ask: BatchAsk) -> dict[str, Any]:
    ids = _batch_ids(conn, query, ask)
    if not ids:
        raise HTTPException(404, "No flow matches: nothing to replay.")
    asked = _asked(ask)
    job = _jobs(request).start(settings, ids, asked, ask.concurrency)
    with write:
        details = {"job": job.id, "flows": len(ids), "group": asked.group, "model": asked.model}
        audit.record(write, "flows.replay_batch", query.link() or "selected flows", details)
    return job.status()


@api.post("/replays", dependencies=[AdminApiChange], status_code=202, response_model=shapes.ReplayJob)
async def start_batch_json(
    request: Request, conn: Conn, write: WriteConn, settings: Settings, query: Flows, ask: Annotated[BatchAsk, Body()]
):
    """Replay the flows a search selects (its query parameters, as /api/flows takes them), or `ids`, in the
    background: answers the job, whose progress GET /api/flows/replays/{job_id} tells."""
    return _start(request, conn, write, settings, query, ask)


@router.post("/replays", dependencies=[AdminForm])
async def start_batch(request: Request, conn: Conn, write: WriteConn, settings: Settings, query: Flows):
    """The flows page's batch replay form: the job's page."""
    form = await request.form()
    try:
        ask = BatchAsk(
            group=str(form.get("group") or "") or None,
            model=str(form.get("model") or "") or None,
            concurrency=int(str(form.get("concurrency") or 4)),
            limit=int(str(form.get("limit") or 100)),
        )
    except ValueError as e:
        raise HTTPException(422, f"Invalid batch: {e}") from None
    return see_other(f"/flows/replays/{_start(request, conn, write, settings, query, ask)['id']}")


def _job(request: Request, job_id: str) -> dict[str, Any]:
    job = _jobs(request).get(job_id)
    if job is None:
        raise HTTPException(404, f"No replay job {job_id} (jobs live until the UI restarts).")
    return job.status()


@api.get("/replays/{job_id}", dependencies=[AdminApi], response_model=shapes.ReplayJob)
def read_batch_json(request: Request, job_id: str) -> dict[str, Any]:
    """A batch replay's progress and summary table."""
    return _job(request, job_id)


@router.get("/replays/{job_id}", response_class=HTMLResponse, dependencies=[AdminPage])
def read_batch(page: PageOf, request: Request, conn: Conn, job_id: str):
    """A batch replay's page: a progress bar while it runs, then the summary table."""
    job = _job(request, job_id)
    return page.render("replay_job.html", {"job": job, "groups": route_names(conn).groups, "section": "flows"})
