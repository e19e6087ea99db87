from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()


@router.get("/health")
def read_health() -> dict[str, str]:
    """Liveness for load balancers and scripts; needs no login and reveals nothing."""
    return {"status": "ok"}
