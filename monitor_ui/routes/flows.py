"""Flows: the searchable list (with live updates and exports) and one flow's detail."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from monitor_ui import export, replays, shapes, views
from monitor_ui.deps import AdminApi, AdminPage, Conn, PageOf, Settings
from monitor_ui.filters import Flows
from monitor_ui.names import names_for, route_names
from storage import db, flows, objects

router = APIRouter(prefix="/flows", tags=["flows"])
api = APIRouter(prefix="/api/flows", tags=["flows"])

Limit = Annotated[int, Query(ge=1, le=500)]
Before = Annotated[int | None, Query(ge=1, description="continue below this flow id (keyset pagination)")]
EXPORT_PAGE = 500
# What a list row shows: the summary, plus cost and first byte.
LIST_COLUMNS = flows.SUMMARY_COLUMNS + ", first_byte_at, cost"


def _page(conn, query: Flows, limit: int, before: int | None) -> dict:
    page = flows.search_page(conn, query.filter, limit, before, columns=LIST_COLUMNS)
    rows = page.rows
    summaries = [views.flow_summary(r) for r in rows]
    names = names_for(conn, [f["upstream_key_id"] for f in summaries], [f["client_key_id"] for f in summaries])
    route = route_names(conn)
    for f in summaries:
        f["upstream_key"], f["client"] = names.key(f["upstream_key_id"]), names.client(f["client_key_id"])
        f["upstream"], f["group"] = route.upstream(f["upstream_id"]), route.group(f["group_id"])
    return {
        "flows": summaries,
        "next_before": _next_before(page, limit, query.filter.after_id is not None),
        # A phrase of common words checked on the newest candidates only: older flows may match too.
        "partial": page.checked_down_to is not None,
    }


def _next_before(page: flows.Page, limit: int, live: bool) -> int | None:
    if live:
        return None
    if page.checked_down_to is not None:
        return page.checked_down_to
    return page.rows[-1]["id"] if len(page.rows) == limit else None


def _detail(conn, flow_row_id: int, proxy_url: str) -> dict:
    row = flows.get_flow(conn, flow_row_id)
    if row is None:
        raise HTTPException(404, f"No flow with id {flow_row_id}.")
    detail = views.flow_detail(row)
    attempts = [dict(a) for a in flows.attempts_of(conn, row["flow_id"])]
    names = names_for(conn, [row["upstream_key_id"], *(a["upstream_key_id"] for a in attempts)], [row["client_key_id"]])
    route = route_names(conn)
    for a in attempts:
        a["upstream_key"] = names.key(a["upstream_key_id"])
        a["upstream"], a["group"] = route.upstream(a["upstream_id"]), route.group(a["group_id"])
        a["group_exists"] = a["group_id"] in route.groups
    detail["attempt_list"] = attempts
    detail["upstream_key"], detail["client"] = names.key(row["upstream_key_id"]), names.client(row["client_key_id"])
    detail["upstream"], detail["group"] = route.upstream(row["upstream_id"]), route.group(row["group_id"])
    detail["group_exists"] = row["group_id"] in route.groups
    detail["events"] = views.sse_events(row["response_body"], detail["chunk_times"]) if row["stream"] else []
    detail["curl"] = views.curl_command(detail, proxy_url)
    detail["objects"] = objects.objects_of_flow(conn, row["flow_id"])  # key affinity: created or used
    detail["request_diff"] = replays.flow_request_diff(row)  # what keyrotor changed on the way
    detail["replays"] = replays.replays_of(conn, flow_row_id)
    return detail


@router.get("", response_class=HTMLResponse, dependencies=[AdminPage])
def list_flows(page: PageOf, conn: Conn, query: Flows, limit: Limit = 50, before: Before = None):
    """Flows, newest first: full-text search, filters, keyset pages; new ones appear while the page is open."""
    found = _page(conn, query, limit, before)
    route = route_names(conn)
    choices = {"upstream_names": sorted(route.upstreams.values()), "group_labels": sorted(route.groups.values())}
    context = {**found, **choices, "limit": limit, "query": query, "live": before is None, "section": "flows"}
    return page.render("flows.html", context)


@api.get("", dependencies=[AdminApi], response_model=shapes.FlowPage)
def list_flows_json(conn: Conn, query: Flows, limit: Limit = 50, before: Before = None) -> dict:
    """Flows as JSON, with the same filters and pagination as the page."""
    return _page(conn, query, limit, before)


def _export_rows(db_path: Path, query: Flows) -> Iterator[sqlite3.Row]:
    # Its own connection: the response streams after the request's dependencies have closed theirs.
    conn = db.connect(db_path, readonly=True)
    try:
        before = None
        sent = 0
        while sent < export.EXPORT_MAX_ROWS:
            rows = flows.search_flows(conn, query.filter, EXPORT_PAGE, before, columns="*")
            yield from rows[: export.EXPORT_MAX_ROWS - sent]
            sent += len(rows)
            if len(rows) < EXPORT_PAGE:
                return
            before = rows[-1]["id"]
    finally:
        conn.close()


@api.get("/export.jsonl", dependencies=[AdminApi], response_class=StreamingResponse)
def export_flows_jsonl(query: Flows, settings: Settings) -> StreamingResponse:
    """The filtered list (newest first, at most 10,000 flows) as JSON Lines, one full flow per line."""
    lines = (export.jsonl_line(row) for row in _export_rows(settings.db_path, query))
    disposition = 'attachment; filename="keyrotor-flows.jsonl"'
    return StreamingResponse(lines, media_type="application/x-ndjson", headers={"content-disposition": disposition})


@api.get("/export.har", dependencies=[AdminApi], response_class=StreamingResponse)
def export_flows_har(request: Request, query: Flows, settings: Settings) -> StreamingResponse:
    """The filtered list (at most 10,000 flows) as a HAR 1.2 file."""
    rows = _export_rows(settings.db_path, query)
    document = export.har_document(rows, settings.upstream, request.app.version)
    return StreamingResponse(
        document,
        media_type="application/json",
        headers={"content-disposition": 'attachment; filename="keyrotor-flows.har"'},
    )


@router.get("/{flow_row_id}", response_class=HTMLResponse, dependencies=[AdminPage])
def read_flow(page: PageOf, flow_row_id: int, conn: Conn, settings: Settings):
    """One flow: timings, attempts, headers, bodies, streamed events, usage and a curl command."""
    detail = _detail(conn, flow_row_id, settings.proxy_url)
    detail["request_body_pretty"] = views.pretty_body(detail["request_body"])
    detail["response_body_pretty"] = views.pretty_body(detail["response_body"]) if not detail["stream"] else None
    replay_body = replays.client_body(detail)  # what "send again" sends unless edited
    return page.render("flow.html", {"flow": detail, "replay_body": replay_body, "section": "flows"})


@api.get("/{flow_row_id}", dependencies=[AdminApi], response_model=shapes.FlowDetail)
def read_flow_json(flow_row_id: int, conn: Conn, settings: Settings) -> dict:
    """One flow as JSON."""
    return _detail(conn, flow_row_id, settings.proxy_url)


@router.get("/{flow_row_id}/download/{side}", dependencies=[AdminApi])
def download_flow_body(flow_row_id: int, side: Literal["request", "response"], conn: Conn) -> Response:
    """A body kept as bytes (audio, an image, an upload's file), as a file to save, never to render."""
    row = flows.get_flow(conn, flow_row_id)
    content = row[f"{side}_body_bytes"] if row is not None else None
    if content is None:
        raise HTTPException(404, f"Flow {flow_row_id} kept no {side} body as bytes.")
    # Whatever type the capture says, the UI serves bytes to save: a captured "text/html" never runs here.
    filename = f"flow-{flow_row_id}-{side}.{views.file_extension(row[f'{side}_body_type'])}"
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"content-disposition": f'attachment; filename="{filename}"', "x-content-type-options": "nosniff"},
    )
