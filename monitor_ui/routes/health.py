from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/health", tags=["health"])


@router.get("")
def read_health() -> dict[str, str]:
    """Liveness for load balancers and scripts; needs no login and reveals nothing."""
    return {"status": "ok"}
