"""keyrotor's own error bodies: OpenAI's shape, whatever failed."""

from __future__ import annotations

import json

import pytest

from core.errors import protocol_error


@pytest.mark.parametrize(
    ("status", "message", "kind", "code"),
    [
        (400, "Invalid Content-Length", "invalid_request_error", "malformed_request"),
        (413, "Request body too large", "invalid_request_error", "request_too_large"),
        (502, "upstream timed out: nothing for 5 s", "server_error", "upstream_timeout"),
        (502, "Connection refused", "server_error", "upstream_error"),
        (504, "", "server_error", "upstream_error"),
        (418, "", "invalid_request_error", "http_418"),
    ],
)
def test_what_mitmproxy_would_answer_in_html_is_an_openai_error(status: int, message: str, kind: str, code: str):
    error = protocol_error(status, message)
    body = json.loads(error.body())["error"]
    assert (error.status, body["type"], body["code"]) == (status, kind, code)
    assert body["message"] == (message or body["message"]) and body["message"]
    assert error.all_headers()["content-type"] == "application/json"
    assert error.all_headers()["x-keyrotor-error"] == code
