"""OpenAI-shaped error bodies, so SDKs surface keyrotor's own errors like upstream ones."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OpenAIError:
    status: int
    message: str
    type: str
    code: str | None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        return json.dumps(
            {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}
        ).encode()

    def all_headers(self) -> dict[str, str]:
        return {"content-type": "application/json", "x-keyrotor-error": self.code or self.type, **self.headers}


# Where mitmproxy would answer with its own HTML page (a request it cannot parse, an upstream it
# could not reach or that timed out, a body over its own limit): the same error in OpenAI's shape.
_PROTOCOL_ERRORS = {
    400: ("invalid_request_error", "malformed_request"),
    413: ("invalid_request_error", "request_too_large"),
}
UPSTREAM_TIMEOUT_PREFIX = "upstream timed out"  # addons/upstream_watch.py's message for a silent exchange


def protocol_error(status: int, message: str) -> OpenAIError:
    """keyrotor's answer for a request or exchange that failed below HTTP (malformed, refused, timed out)."""
    if status in _PROTOCOL_ERRORS:
        kind, code = _PROTOCOL_ERRORS[status]
        return OpenAIError(status, message or "The request could not be read.", kind, code, {"x-should-retry": "false"})
    if status >= 500:
        code = "upstream_timeout" if message.startswith(UPSTREAM_TIMEOUT_PREFIX) else "upstream_error"
        return OpenAIError(status, message or "The upstream exchange failed.", "server_error", code)
    return OpenAIError(status, message or "The request failed.", "invalid_request_error", f"http_{status}")
