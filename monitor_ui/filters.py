"""Query parameters of the flows page, its JSON twin and the exports, parsed once into a FlowFilter."""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import urlencode

from fastapi import Depends, HTTPException, Query

from core.tags import SESSION_RULE, is_session, is_tag
from monitor_ui.deps import Conn
from monitor_ui.names import route_names
from monitor_ui.ranges import RANGES, range_since
from storage import routes
from storage.flows import STATUS_CLASSES, FlowFilter


def parse_time(value: str | None, name: str) -> float | None:
    """Seconds since the epoch, or an ISO date/time (UTC unless it says otherwise, as datetime-local sends it)."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        message = f"{name} must be a date and time like 2026-11-22T14:30 (UTC) or seconds since the epoch."
        raise HTTPException(422, message) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_id(value: str | None, name: str) -> int | None:
    """A key id from the filter form, whose empty field means "any" (so it cannot be an int parameter)."""
    if not value or not value.strip():
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise HTTPException(422, f"{name} must be a key id (a whole number from 1).")
    return number


def upstream_id_of(conn: sqlite3.Connection, value: str | None) -> int | None:
    """An upstream filter: its name, or its id (the flows of a deleted upstream keep only that)."""
    value = (value or "").strip()
    if not value:
        return None
    for upstream_id, name in routes.upstream_names(conn).items():
        if name == value:
            return upstream_id
    if value.isdecimal() and int(value) >= 1:
        return int(value)
    raise HTTPException(422, f"upstream must be an upstream's name or id, and there is no upstream {value!r}.")


def group_id_of(conn: sqlite3.Connection, value: str | None) -> int | None:
    """A group filter: its UPSTREAM/GROUP label, or its id."""
    value = (value or "").strip()
    if not value:
        return None
    if value.isdecimal() and int(value) >= 1:
        return int(value)
    try:
        return routes.group_id_of(conn, value)
    except (routes.NotFound, ValueError):
        raise HTTPException(422, f"group must be a group's UPSTREAM/GROUP label or id, not {value!r}.") from None


@dataclass(frozen=True)
class FlowQuery:
    """The filter plus the raw values, so the page can show them again and build links."""

    filter: FlowFilter
    raw: dict[str, str]

    def link(self, **extra: str | int) -> str:
        return query_link(self.raw, **extra)


def query_link(raw: dict[str, str], **extra: str | int) -> str:
    """A filter's query string for links: the values given (empty ones left out), and `extra`."""
    return urlencode({**{k: v for k, v in raw.items() if v}, **{k: str(v) for k, v in extra.items()}})


def flow_query(
    conn: Conn,
    q: Annotated[str | None, Query(max_length=500, description="words that must all appear (full-text)")] = None,
    status: Annotated[str | None, Query(description="2xx, 3xx, 4xx, 5xx, error, or one code such as 429")] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    path: Annotated[str | None, Query(max_length=500, description="path prefix, e.g. /v1/chat")] = None,
    client: Annotated[str | None, Query(max_length=20, description="client key id")] = None,
    key: Annotated[str | None, Query(max_length=20, description="upstream key id")] = None,
    client_id: Annotated[str | None, Query(max_length=20, description="client id: the flows of all its keys")] = None,
    upstream: Annotated[str | None, Query(max_length=200, description="upstream name (or id)")] = None,
    group: Annotated[str | None, Query(max_length=200, description="group as UPSTREAM/GROUP (or id)")] = None,
    stream: Annotated[str | None, Query(description="yes or no")] = None,
    refusal: Annotated[
        str | None, Query(max_length=60, description="a refusal's code (model_not_allowed, …), or any")
    ] = None,
    tag: Annotated[str | None, Query(max_length=64, description="one of the flows' x-keyrotor-tags")] = None,
    session: Annotated[str | None, Query(max_length=128, description="the flows' x-keyrotor-session")] = None,
    time_range: Annotated[
        str | None,
        Query(alias="range", max_length=8, description="1h, 24h, 7d or 30d back from now (instead of since/until)"),
    ] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
    after: Annotated[int | None, Query(ge=0, description="only flows with a larger id (live updates)")] = None,
) -> FlowQuery:
    if status and status not in (*STATUS_CLASSES, "error") and not re.fullmatch(r"[1-5][0-9][0-9]", status):
        raise HTTPException(422, "status must be one of 2xx, 3xx, 4xx, 5xx, error, or a code such as 429.")
    if stream and stream not in ("yes", "no"):
        raise HTTPException(422, "stream must be yes or no.")
    tag, session = (tag or "").strip(), (session or "").strip()
    if tag and not is_tag(tag):
        raise HTTPException(422, "tag must be 1-64 letters, digits or . _ : / @ -.")
    if session and not is_session(session):
        raise HTTPException(422, f"session must be {SESSION_RULE}.")
    if time_range and time_range not in RANGES:
        raise HTTPException(422, f"range must be one of {', '.join(RANGES)}.")
    client_key_id, key_id = parse_id(client, "client"), parse_id(key, "key")
    owner_id = parse_id(client_id, "client_id")
    upstream_id, group_id = upstream_id_of(conn, upstream), group_id_of(conn, group)
    route = route_names(conn)
    raw = {
        "q": q or "",
        "status": status or "",
        "model": model or "",
        "path": path or "",
        "client": str(client_key_id or ""),
        "client_id": str(owner_id or ""),
        "key": str(key_id or ""),
        # Shown again, and carried in links, by name; a deleted one by its id.
        "upstream": route.upstreams.get(upstream_id, str(upstream_id)) if upstream_id else "",
        "group": route.groups.get(group_id, str(group_id)) if group_id else "",
        "stream": stream or "",
        "refusal": (refusal or "").strip(),
        "tag": tag,
        "session": session,
        "range": time_range or "",
        "since": since or "" if not time_range else "",
        "until": until or "" if not time_range else "",
    }
    flow_filter = FlowFilter(
        q=q.strip() or None if q else None,
        status=status or None,
        model=model or None,
        path=path or None,
        client_key_id=client_key_id,
        client_id=owner_id,
        upstream_key_id=key_id,
        upstream_id=upstream_id,
        group_id=group_id,
        stream=None if not stream else stream == "yes",
        refusal=(refusal or "").strip() or None,
        tag=tag or None,
        session=session or None,
        since=range_since(time_range) if time_range else parse_time(since, "since"),
        until=None if time_range else parse_time(until, "until"),
        after_id=after,
    )
    return FlowQuery(flow_filter, raw)


Flows = Annotated[FlowQuery, Depends(flow_query)]
