"""Turning stored rows into what pages and the JSON API show. Pure functions, no SQL."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from typing import Any


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def pretty_body(text: str | None) -> str | None:
    """JSON bodies indented for reading; anything else unchanged."""
    if not text or text[:1] not in "{[":
        return text
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def streamed_text(body: str | None) -> str | None:
    """The assistant text a streamed chat completion carried, reassembled from its SSE events."""
    if not body:
        return None
    parts = []
    for line in body.splitlines():
        if not line.startswith("data:"):
            continue
        try:
            event = json.loads(line[5:].strip())
        except ValueError:
            continue
        choices = event.get("choices") if isinstance(event, dict) else None
        for choice in choices or []:
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str):
                parts.append(content)
    return "".join(parts) if parts else None


def flow_summary(row: sqlite3.Row) -> dict[str, Any]:
    summary = dict(row)
    summary["started_at"] = iso(row["started_at"])
    summary["stream"] = bool(row["stream"])
    return summary


def flow_detail(row: sqlite3.Row) -> dict[str, Any]:
    detail = dict(row)
    for name in ("started_at", "first_byte_at", "ended_at"):
        detail[name] = iso(row[name])
    for name in ("request_headers", "response_headers", "chunk_times"):
        detail[name] = json.loads(row[name]) if row[name] else []
    detail["stream"] = bool(row["stream"])
    detail["streamed_text"] = streamed_text(row["response_body"]) if row["stream"] else None
    detail["time_to_first_byte_ms"] = (
        round((row["first_byte_at"] - row["started_at"]) * 1000, 1) if row["first_byte_at"] else None
    )
    return detail
