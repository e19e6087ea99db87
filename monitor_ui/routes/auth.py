"""Logging in with the admin key (a session cookie) and out."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from core.limits import duration
from core.login_throttle import LoginThrottle
from monitor_ui.auth import SESSION_COOKIE, SESSION_SECONDS, SessionSigner
from monitor_ui.deps import (
    Settings,
    Signer,
    Templates,
    Throttle,
    TooManyGuesses,
    UiSettings,
    admin_key_checked,
    client_address,
)
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
def read_login(request: Request, templates: Templates, throttle: Throttle, next: str | None = None):
    """The login form; while this address must wait, it says for how long."""
    wait = _wait(throttle, client_address(request))
    error = _wait_sentence(wait) if wait else None
    return templates.TemplateResponse(
        request, "login.html", {"next": _safe_next(next), "error": error, "retry_after": wait}
    )


def _wait(throttle: LoginThrottle, address: str) -> int | None:
    """Seconds before this address's next admin key is checked at all (held) or a wrong one is not refused."""
    now = time.time()
    return throttle.busy(address, now) or throttle.retry_after(address, now)


def _wait_sentence(seconds: int) -> str:
    until = datetime.fromtimestamp(time.time() + seconds, UTC)
    return (
        f"Too many wrong admin keys from this address: wait {duration(seconds)} (until {until:%H:%M:%S} UTC)"
        " before trying another. The right admin key is not locked out."
    )


@router.post("/login")
async def create_session(
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
    try:
        # Counted and slowed per address; 429 while the address is locked. The right key is accepted
        # even then: guesses cannot lock the admin out for everyone at that address.
        right = await admin_key_checked(request, signer, throttle, settings, admin_key.strip(), audit.UI_SESSION)
    except TooManyGuesses as refused:
        # A person at a browser: the login page with the wait, never the API's JSON.
        context = {"next": _safe_next(next), "error": _wait_sentence(refused.retry_after)}
        context["retry_after"] = refused.retry_after
        return templates.TemplateResponse(request, "login.html", context, status_code=429, headers=refused.headers)
    if not right:
        return templates.TemplateResponse(
            request, "login.html", {"next": _safe_next(next), "error": "That is not the admin key."}, status_code=401
        )
    address = client_address(request)
    throttle.succeeded(address)  # on the loop, as every other use of the throttle
    return await run_in_threadpool(_logged_in, request, signer, settings, address, next)


def _logged_in(request: Request, signer: SessionSigner, settings: UiSettings, address: str, next: str):
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
