"""Upstream keys through the JSON API: list, weight, re-validation. Values never leave the database."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from addons import probe
from monitor_ui.deps import AdminApi, AdminApiChange, Conn, WriteConn
from storage import secrets, upstream_keys

router = APIRouter()


class WeightChange(BaseModel):
    weight: float = Field(gt=0, le=1000, description="share under the weighted strategy (default 1)")


class ValidationRequest(BaseModel):
    ids: list[int] = Field(default_factory=list, max_length=10_000, description="keys to probe")
    all: bool = Field(False, description="with no ids: every key that is not disabled")


def key_summary(row) -> dict:
    return {
        "id": row["id"], "key": f"…{row['last4']}", "state": row["state"], "state_reason": row["state_reason"],
        "cooldown_until": row["cooldown_until"], "weight": row["weight"], "requests": row["requests"],
        "prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"],
        "last_used_at": row["last_used_at"], "created_at": row["created_at"],
    }  # fmt: skip


@router.get("/api/keys", dependencies=[AdminApi])
def list_keys_json(conn: Conn) -> dict:
    """Every upstream key, masked, with state and usage."""
    return {"keys": [key_summary(r) for r in upstream_keys.list_keys(conn)]}


@router.post("/api/keys/{key_id}/weight", dependencies=[AdminApiChange])
def update_key_weight(key_id: int, change: WeightChange, conn: WriteConn) -> dict:
    """Set one key's weight; the proxy uses it within a second."""
    if not upstream_keys.set_weight(conn, [key_id], change.weight):
        raise HTTPException(404, f"No upstream key with id {key_id}.")
    return {"id": key_id, "weight": change.weight}


@router.post("/api/keys/validate", dependencies=[AdminApiChange])
async def validate_keys(request: Request, wanted: ValidationRequest, conn: WriteConn) -> dict:
    """Probe keys with GET /v1/models (no tokens spent); by default every invalid or exhausted one."""
    ids = probe.ids_to_validate(conn, wanted.ids, wanted.all)
    cipher = secrets.key_cipher(request.app.state.db_path)
    results = await probe.validate_keys(conn, cipher, request.app.state.upstream, ids)
    return {"results": [r.as_dict() for r in results],
            "skipped": sorted(set(ids) - {r.key_id for r in results})}  # fmt: skip
