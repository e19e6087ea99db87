"""The audit log: every administrative act (CLI, UI session, admin API), newest first, with filters."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse

from monitor_ui import views
from monitor_ui.auth import SESSION_COOKIE
from monitor_ui.deps import AdminApi, AdminPage, Conn, Signer
from monitor_ui.filters import parse_time
from storage import audit

router = APIRouter()


def audit_filter(
    actor: Annotated[str | None, Query(description="cli, ui-session or admin-api")] = None,
    action: Annotated[
        str | None, Query(max_length=100, description="an action or its prefix: keys, clients.set")
    ] = None,
    target: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
) -> audit.AuditFilter:
    if actor and actor not in audit.ACTORS:
        raise HTTPException(422, f"actor must be one of {', '.join(audit.ACTORS)}.")
    return audit.AuditFilter(
        actor=actor or None,
        action=(action or "").strip() or None,
        target=(target or "").strip() or None,
        since=parse_time(since, "since"),
        until=parse_time(until, "until"),
    )


def _public(entry: dict) -> dict:
    return {k: entry[k] for k in ("at", "actor", "address", "action", "target", "changes")}


@router.get("/audit", response_class=HTMLResponse, dependencies=[AdminPage])
def list_audit(
    request: Request,
    conn: Conn,
    signer: Signer,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: Annotated[int, Query(ge=1, le=audit.PAGE_LIMIT)] = 100,
):
    """Administrative acts, newest first."""
    f = audit_filter(actor, action, target, since, until)
    raw = {
        "actor": actor or "",
        "action": action or "",
        "target": target or "",
        "since": since or "",
        "until": until or "",
    }
    context = {
        "entries": audit.entries(conn, f, limit),
        "raw": raw,
        "actors": audit.ACTORS,
        "section": "audit",
        "csrf": signer.csrf_token(request.cookies.get(SESSION_COOKIE, "")),  # the nav and logout need it
        "iso": views.iso,
        "json_link": "/api/audit?" + urlencode({k: v for k, v in raw.items() if v}),
    }
    return request.app.state.templates.TemplateResponse(request, "audit.html", context)


@router.get("/api/audit", dependencies=[AdminApi])
def list_audit_json(
    conn: Conn,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: Annotated[int, Query(ge=1, le=audit.PAGE_LIMIT)] = 100,
) -> dict:
    """Administrative acts, newest first: at, actor, address, action, target, changes (never a secret)."""
    f = audit_filter(actor, action, target, since, until)
    return {"entries": [_public(e) for e in audit.entries(conn, f, limit)]}
