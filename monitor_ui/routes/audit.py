"""The audit log: every administrative act (CLI, UI session, admin API), newest first, with filters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import HTMLResponse

from monitor_ui import shapes, views
from monitor_ui.deps import AdminApi, AdminPage, Conn, PageOf
from monitor_ui.filters import parse_time, query_link
from storage import audit

router = APIRouter(prefix="/audit", tags=["audit"])
api = APIRouter(prefix="/api/audit", tags=["audit"])


@dataclass(frozen=True)
class AuditQuery:
    """The filter of the audit page and its JSON twin, and the values as given (for the form and links)."""

    filter: audit.AuditFilter
    raw: dict[str, str]


def audit_query(
    actor: Annotated[str | None, Query(description="cli, ui-session or admin-api")] = None,
    action: Annotated[
        str | None, Query(max_length=100, description="an action or its prefix: keys, clients.set")
    ] = None,
    target: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
) -> AuditQuery:
    if actor and actor not in audit.ACTORS:
        raise HTTPException(422, f"actor must be one of {', '.join(audit.ACTORS)}.")
    f = audit.AuditFilter(
        actor=actor or None,
        action=(action or "").strip() or None,
        target=(target or "").strip() or None,
        since=parse_time(since, "since"),
        until=parse_time(until, "until"),
    )
    given = {"actor": actor, "action": action, "target": target, "since": since, "until": until}
    return AuditQuery(f, {name: value or "" for name, value in given.items()})


Audit = Annotated[AuditQuery, Depends(audit_query)]
Limit = Annotated[int, Query(ge=1, le=audit.PAGE_LIMIT)]


def _public(entry: dict) -> dict:
    return {k: entry[k] for k in ("at", "actor", "address", "action", "target", "changes")}


@router.get("", response_class=HTMLResponse, dependencies=[AdminPage])
def list_audit(page: PageOf, conn: Conn, query: Audit, limit: Limit = 100):
    """Administrative acts, newest first."""
    context = {
        "entries": audit.entries(conn, query.filter, limit),
        "raw": query.raw,
        "actors": audit.ACTORS,
        "section": "audit",
        "iso": views.iso,
        "json_link": "/api/audit?" + query_link(query.raw),
    }
    return page.render("audit.html", context)


@api.get("", dependencies=[AdminApi], response_model=shapes.AuditEntries)
def list_audit_json(conn: Conn, query: Audit, limit: Limit = 100) -> dict:
    """Administrative acts, newest first: at, actor, address, action, target, changes (never a secret)."""
    return {"entries": [_public(e) for e in audit.entries(conn, query.filter, limit)]}
