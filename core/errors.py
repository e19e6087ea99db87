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
