"""Query parameters of the flows page, its JSON twin and the exports, parsed once into a FlowFilter."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import urlencode

from fastapi import Depends, HTTPException, Query

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


@dataclass(frozen=True)
class FlowQuery:
    """The filter plus the raw values, so the page can show them again and build links."""

    filter: FlowFilter
    raw: dict[str, str]

    def link(self, **extra: str | int) -> str:
        return urlencode({**{k: v for k, v in self.raw.items() if v}, **{k: str(v) for k, v in extra.items()}})


def flow_query(
    q: Annotated[str | None, Query(max_length=500, description="words that must all appear (full-text)")] = None,
    status: Annotated[str | None, Query(description="2xx, 3xx, 4xx, 5xx, error, or one code such as 429")] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    path: Annotated[str | None, Query(max_length=500, description="path prefix, e.g. /v1/chat")] = None,
    client: Annotated[str | None, Query(max_length=20, description="client key id")] = None,
    key: Annotated[str | None, Query(max_length=20, description="upstream key id")] = None,
    stream: Annotated[str | None, Query(description="yes or no")] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
    after: Annotated[int | None, Query(ge=0, description="only flows with a larger id (live updates)")] = None,
) -> FlowQuery:
    if status and status not in (*STATUS_CLASSES, "error") and not re.fullmatch(r"[1-5][0-9][0-9]", status):
        raise HTTPException(422, "status must be one of 2xx, 3xx, 4xx, 5xx, error, or a code such as 429.")
    if stream and stream not in ("yes", "no"):
        raise HTTPException(422, "stream must be yes or no.")
    client_id, key_id = parse_id(client, "client"), parse_id(key, "key")
    raw = {
        "q": q or "",
        "status": status or "",
        "model": model or "",
        "path": path or "",
        "client": str(client_id or ""),
        "key": str(key_id or ""),
        "stream": stream or "",
        "since": since or "",
        "until": until or "",
    }
    flow_filter = FlowFilter(
        q=q.strip() or None if q else None,
        status=status or None,
        model=model or None,
        path=path or None,
        client_key_id=client_id,
        upstream_key_id=key_id,
        stream=None if not stream else stream == "yes",
        since=parse_time(since, "since"),
        until=parse_time(until, "until"),
        after_id=after,
    )
    return FlowQuery(flow_filter, raw)


Flows = Annotated[FlowQuery, Depends(flow_query)]
