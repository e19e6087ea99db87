"""The addresses browsers and bookmarks ask for without being told: the favicon and the root (no login)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from monitor_ui.pages import see_other

router = APIRouter(tags=["assets"])

FAVICON = Path(__file__).parent.parent / "static" / "favicon.svg"


@router.get("/favicon.ico", include_in_schema=False)
def read_favicon() -> FileResponse:
    """The same SVG icon the pages link to; every current browser reads SVG whatever the name says."""
    return FileResponse(FAVICON, media_type="image/svg+xml", headers={"cache-control": "max-age=86400"})


@router.get("/", include_in_schema=False)
def read_root() -> RedirectResponse:
    """The dashboard is the front page."""
    return see_other("/dashboard")
