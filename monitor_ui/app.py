"""The monitor UI application: `create_app(settings)` is what run.py serves."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from config import Settings
from monitor_ui.auth import SessionSigner
from monitor_ui.deps import LoginRequired
from monitor_ui.routes import auth, flows, health

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape is on for .html

# Captured bodies are attacker-controlled: no inline script, no remote anything.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="keyrotor monitor", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.db_path = settings.storage_path
    app.state.signer = SessionSigner(settings.storage_path)
    app.state.templates = templates
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for module in (auth, flows, health):
        app.include_router(module.router)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired):
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def openai_shaped(request: Request, exc: StarletteHTTPException):
        # The same error shape as the proxy's, so one client library handles both.
        return JSONResponse(
            {"error": {"message": str(exc.detail), "type": "invalid_request_error", "code": str(exc.status_code)}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    return app
