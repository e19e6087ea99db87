"""The flows list as JSONL and as HAR 1.2 (importable into browser dev tools and mitmproxy).

Pure functions from stored rows to text; the routes stream them page by page.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

from monitor_ui import views

EXPORT_MAX_ROWS = 10_000


def jsonl_line(row: sqlite3.Row) -> str:
    return json.dumps(views.flow_detail(row), ensure_ascii=False) + "\n"


def _headers(stored: str | None) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in json.loads(stored or "[]")]


def _mime(headers: list[dict[str, str]]) -> str:
    return next((h["value"] for h in headers if h["name"].lower() == "content-type"), "")


def har_entry(row: sqlite3.Row, origin: str) -> dict[str, Any]:
    request_headers, response_headers = _headers(row["request_headers"]), _headers(row["response_headers"])
    duration = row["duration_ms"] or 0.0
    wait = (row["first_byte_at"] - row["started_at"]) * 1000 if row["first_byte_at"] else duration
    status = row["status"] or 0
    entry: dict[str, Any] = {
        "startedDateTime": views.iso(row["started_at"]),
        "time": duration,
        "request": {
            "method": row["method"],
            "url": origin + row["path"],
            "httpVersion": "HTTP/1.1",
            "cookies": [],
            "headers": request_headers,
            "queryString": [],
            "headersSize": -1,
            "bodySize": row["request_body_size"] if row["request_body_size"] is not None else -1,
        },
        "response": {
            "status": status,
            "statusText": HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "",
            "httpVersion": "HTTP/1.1",
            "cookies": [],
            "headers": response_headers,
            "content": {
                "size": row["response_body_size"] or 0,
                "mimeType": _mime(response_headers),
                "text": row["response_body"] or "",
            },
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": row["response_body_size"] if row["response_body_size"] is not None else -1,
        },
        "cache": {},
        "timings": {"send": 0, "wait": round(wait, 3), "receive": round(max(0.0, duration - wait), 3)},
        "_keyrotor": {
            "flow_id": row["flow_id"],
            "id": row["id"],
            "model": row["model"],
            "attempts": row["attempts"],
            "upstream_key_id": row["upstream_key_id"],
            "client_key_id": row["client_key_id"],
            "error": row["error"],
        },
    }
    if row["request_body"] is not None:
        entry["request"]["postData"] = {"mimeType": _mime(request_headers), "text": row["request_body"]}
    if row["response_body_bytes"] is not None:  # audio, an image: HAR carries bytes as base64
        content = entry["response"]["content"]
        content["text"] = base64.b64encode(row["response_body_bytes"]).decode()
        content["encoding"] = "base64"
    return entry


def har_document(rows: Iterator[sqlite3.Row], origin: str, version: str) -> Iterator[str]:
    """A HAR log written entry by entry, so a large export never sits in memory whole."""
    yield '{"log": {"version": "1.2", "creator": {"name": "keyrotor", "version": ' + json.dumps(version) + "},"
    yield ' "entries": ['
    for index, row in enumerate(rows):
        yield ("," if index else "") + "\n" + json.dumps(har_entry(row, origin), ensure_ascii=False)
    yield "\n]}}\n"
