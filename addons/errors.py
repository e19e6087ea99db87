"""OpenAI-shaped error responses, so SDKs surface keyrotor's own errors like upstream ones."""

from __future__ import annotations

import json

from mitmproxy import http


def error_response(
    status: int, message: str, type_: str, code: str | None, headers: dict[str, str] | None = None
) -> http.Response:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    return http.Response.make(
        status, body, {"content-type": "application/json", "x-keyrotor-error": code or type_, **(headers or {})}
    )
