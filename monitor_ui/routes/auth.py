"""Logging in with the admin key (a session cookie) and out."""

from __future__ import annotations

import time
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


def _login_page(templates: Templates, request: Request, next: str | None, error: str | None, status_code: int = 200):
    return templates.TemplateResponse(
        request, "login.html", {"next": _safe_next(next), "error": error}, status_code=status_code
    )


def _wait_page(templates: Templates, request: Request, next: str | None, refused: HTTPException) -> HTMLResponse:
    """The form again, saying how long this address must wait (the refusal's Retry-After), not the JSON of a 429."""
    retry_after = (refused.headers or {}).get("Retry-After", "")
    seconds = int(retry_after) if retry_after.isdigit() else None
    error = "Too many wrong admin keys from this address: " + (
        f"try again in {seconds} s." if seconds is not None else "try again later."
    )
    response = templates.TemplateResponse(
        request,
        "login.html",
        {"next": _safe_next(next), "error": error, "retry_after": seconds},
        status_code=refused.status_code,
    )
    response.headers.update(refused.headers or {})
    return response


@router.get("/login", response_class=HTMLResponse)
def read_login(request: Request, templates: Templates, throttle: Throttle, next: str | None = None):
    """The login form; while this address is locked out, with how long it must wait."""
    locked = throttle.retry_after(client_address(request), time.time())
    if locked is None:
        return _login_page(templates, request, next, None)
    return _wait_page(templates, request, next, HTTPException(200, headers={"Retry-After": str(locked)}))


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
        try:
            refuse_guess(request, throttle, settings, audit.UI_SESSION)
        except HTTPException as refused:
            if refused.status_code != 429:
                raise
            return _wait_page(templates, request, next, refused)
        return _login_page(templates, request, next, "That is not the admin key.", 401)
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
