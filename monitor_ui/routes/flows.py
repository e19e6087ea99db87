from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from monitor_ui import views
from monitor_ui.auth import SESSION_COOKIE
from monitor_ui.deps import AdminApi, AdminPage, Conn, Signer
from storage import flows

router = APIRouter()

Limit = Annotated[int, Query(ge=1, le=500)]
Before = Annotated[int | None, Query(ge=1, description="continue below this flow id (keyset pagination)")]


def _page(conn, limit: int, before: int | None) -> dict:
    rows = flows.recent_flows(conn, limit, before)
    return {
        "flows": [views.flow_summary(r) for r in rows],
        "next_before": rows[-1]["id"] if len(rows) == limit else None,
    }


def _detail(conn, flow_row_id: int) -> dict:
    row = flows.get_flow(conn, flow_row_id)
    if row is None:
        raise HTTPException(404, f"No flow with id {flow_row_id}.")
    return views.flow_detail(row)


@router.get("/", include_in_schema=False)
def read_root() -> RedirectResponse:
    return RedirectResponse("/flows", status_code=303)


@router.get("/flows", response_class=HTMLResponse, dependencies=[AdminPage])
def list_flows(request: Request, conn: Conn, signer: Signer, limit: Limit = 50, before: Before = None):
    """Recent flows, newest first."""
    page = _page(conn, limit, before)
    csrf = signer.csrf_token(request.cookies.get(SESSION_COOKIE, ""))
    return request.app.state.templates.TemplateResponse(
        request, "flows.html", {**page, "limit": limit, "csrf": csrf}
    )


@router.get("/api/flows", dependencies=[AdminApi])
def list_flows_json(conn: Conn, limit: Limit = 50, before: Before = None) -> dict:
    """Recent flows, newest first, as JSON."""
    return _page(conn, limit, before)


@router.get("/flows/{flow_row_id}", response_class=HTMLResponse, dependencies=[AdminPage])
def read_flow(request: Request, flow_row_id: int, conn: Conn, signer: Signer):
    """One flow: timings, headers, bodies."""
    detail = _detail(conn, flow_row_id)
    detail["request_body_pretty"] = views.pretty_body(detail["request_body"])
    detail["response_body_pretty"] = views.pretty_body(detail["response_body"]) if not detail["stream"] else None
    csrf = signer.csrf_token(request.cookies.get(SESSION_COOKIE, ""))
    return request.app.state.templates.TemplateResponse(request, "flow.html", {"flow": detail, "csrf": csrf})


@router.get("/api/flows/{flow_row_id}", dependencies=[AdminApi])
def read_flow_json(flow_row_id: int, conn: Conn) -> dict:
    """One flow as JSON."""
    return _detail(conn, flow_row_id)
