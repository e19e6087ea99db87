"""The favicon, at the address browsers and bookmarks ask for without being told (no login)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter()

FAVICON = Path(__file__).parent.parent / "static" / "favicon.svg"


@router.get("/favicon.ico", include_in_schema=False)
def read_favicon() -> FileResponse:
    """The same SVG icon the pages link to; every current browser reads SVG whatever the name says."""
    return FileResponse(FAVICON, media_type="image/svg+xml", headers={"cache-control": "max-age=86400"})
