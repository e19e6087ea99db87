"""Logging in with the admin key (a session cookie) and out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse

from monitor_ui.auth import SESSION_COOKIE, SESSION_SECONDS
from monitor_ui.deps import Settings, Signer, Templates, Throttle, client_address, refuse_guess
from monitor_ui.pages import see_other
from storage import audit

router = APIRouter(tags=["session"])


def _safe_next(target: str | None) -> str:
    # Only local paths: an open redirect after login would be a phishing aid.
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return "/dashboard"


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"


@router.get("/login", response_class=HTMLResponse)
def read_login(request: Request, templates: Templates, next: str | None = None):
    """The login form."""
    return templates.TemplateResponse(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login")
def create_session(
    request: Request,
    signer: Signer,
    settings: Settings,
    templates: Templates,
    throttle: Throttle,
    admin_key: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
):
    """Exchange the admin key for a session cookie."""
    next = next or request.query_params.get("next", "")
    if not _same_origin(request):
        raise HTTPException(403, "Cross-site login refused.")
    if not signer.check_admin_key(admin_key.strip()):
        # Counted and slowed per address; 429 once the address is locked. The right key is checked
        # first and always accepted: guesses cannot lock the admin out for everyone at that address.
        refuse_guess(request, throttle, settings, audit.UI_SESSION)
        return templates.TemplateResponse(
            request, "login.html", {"next": _safe_next(next), "error": "That is not the admin key."}, status_code=401
        )
    address = client_address(request)
    throttle.succeeded(address)
    audit.log_now(settings.db_path, "login.succeeded", None, None, audit.Actor(audit.UI_SESSION, address))
    response = see_other(_safe_next(next))
    response.set_cookie(
        SESSION_COOKIE,
        signer.new_session(),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def delete_session(request: Request, signer: Signer, csrf: Annotated[str, Form()] = ""):
    """End the session (CSRF-protected, so another site cannot log you out)."""
    if not signer.valid_csrf(request.cookies.get(SESSION_COOKIE), csrf):
        raise HTTPException(403, "Missing or wrong CSRF token.")
    signer.end_session(request.cookies.get(SESSION_COOKIE))  # a copy of the cookie stops working too
    response = see_other("/login")
    response.delete_cookie(SESSION_COOKIE)
    return response
