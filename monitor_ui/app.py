"""The monitor UI application: `create_app(settings)` is what run.py serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from config import Settings
from core.addresses import Network, client_address, parse_networks
from core.login_throttle import LoginThrottle
from monitor_ui import deps, tracer, views
from monitor_ui.alerting import Alerting
from monitor_ui.auth import SessionSigner
from monitor_ui.deps import LoginRequired, UiSettings
from monitor_ui.routes import (
    alerts,
    assets,
    audit,
    auth,
    clients,
    dashboard,
    flows,
    groups,
    health,
    keys,
    metrics,
    models,
    playground,
    replays,
    traces,
    upstreams,
)
from monitor_ui.trace_listener import listener_for
from storage import audit as audit_log
from storage import redis_shared

HERE = Path(__file__).parent
# Pages and their JSON twins under /api/ never share a path, so each area's two routers go in side by side.
ROUTERS = (
    alerts.router,
    alerts.api,
    assets.router,
    audit.router,
    audit.api,
    auth.router,
    clients.router,
    clients.api,
    dashboard.router,
    dashboard.api,
    replays.router,  # before flows': /flows/compare and /flows/replays/… are not /flows/{flow_row_id}
    replays.api,
    flows.router,
    flows.api,
    groups.router,
    groups.api,
    health.router,
    keys.router,
    keys.api,
    metrics.router,
    models.router,
    models.api,
    traces.router,
    traces.api,
    playground.router,
    playground.api,
    upstreams.router,
    upstreams.api,
)
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape is on for .html
templates.env.filters["breaks_at_slash"] = views.breaks_at_slash

# Captured bodies are attacker-controlled: no inline script, no remote anything.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on our own form
    # posts, which the login's cross-site check must refuse. Other sites still get no referrer.
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}


def error_json(status: int, message: str, headers: dict | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": str(status)}},
        status_code=status,
        headers=headers,
    )


class TrustedProxies:
    """ASGI middleware: a request from a trusted proxy counts as coming from the client it forwarded."""

    def __init__(self, app: ASGIApp, trusted: tuple[Network, ...]) -> None:
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        peer = scope.get("client")
        if scope["type"] in ("http", "websocket") and peer and self.trusted:
            forwarded = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
            address = client_address(peer[0], forwarded, self.trusted)
            if address != peer[0]:
                scope = {**scope, "client": (address, 0)}
        await self.app(scope, receive, send)


log = logging.getLogger(__name__)


def background(settings: Settings, alerting: Alerting | None):
    """The UI process's own work beside the pages: the trace listener (trace.port), scheduled traces
    (trace.schedule), and the alert checks and webhook sends (monitor_ui/alerting.py)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        listener = listener_for(settings) if settings.trace.port else None
        if listener is not None:
            await listener.start()  # a taken port stops the UI's start, with uvicorn's message
        schedule = None
        if settings.trace.port and tracer.schedule_entries(settings):
            every = settings.trace.schedule_minutes * 60
            schedule = asyncio.create_task(tracer.run_schedule(settings, every))
        if alerting is not None:
            alerting.start()
        try:
            yield
        finally:
            if alerting is not None:
                alerting.stop()
            if schedule is not None:
                schedule.cancel()
            if listener is not None:
                await listener.close()

    return lifespan


def create_app(settings: Settings, check_alerts: bool = True) -> FastAPI:
    """`check_alerts`: run the alert checks and webhook sends (monitor_ui/alerting.py) while the app serves."""
    deps.use_storage(settings)
    alerting = Alerting(settings.storage_path, settings.alerts)
    app = FastAPI(
        title="keyrotor monitor",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=background(settings, alerting if check_alerts else None),
    )
    app.state.alerting = alerting
    # Read by monitor_ui.deps alone: the handlers receive them as parameters.
    app.state.settings = UiSettings(
        db_path=settings.storage_path,
        upstream=settings["proxy.upstream"],
        proxy_url=f"http://{settings['proxy.host']}:{settings['proxy.port']}",
        metrics_token=settings["ui.metrics_token"],
        trusted_proxies=parse_networks(settings["ui.trusted_proxies"]),
        redis_url=settings.redis.url,
    )
    redis_shared.announce_revisions(settings.redis.url)  # admin changes reach the nodes at once
    app.state.config = settings  # for what the UI sends through the proxy (monitor_ui/through_proxy.py)
    app.state.signer = SessionSigner(settings.storage_path)
    app.state.templates = templates
    app.state.login_throttle = LoginThrottle()
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for router in ROUTERS:
        app.include_router(router)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        # Whoever changes something in this request, the audit log names (storage/audit.py); only
        # authenticated requests reach a change, so the actor is named by how the request came.
        address = request.client.host if request.client else None
        bearer = request.headers.get("authorization", "").lower().startswith("bearer ")
        audit_log.set_actor(audit_log.Actor(audit_log.ADMIN_API if bearer else audit_log.UI_SESSION, address))
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    # Added last, so outermost: everything after it (the audit actor, the login throttle) reads the
    # client's address, which behind a trusted proxy is the one it forwarded (core/addresses.py).
    app.add_middleware(TrustedProxies, trusted=app.state.settings.trusted_proxies)

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired):
        wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': wanted})}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def openai_shaped(request: Request, exc: StarletteHTTPException):
        # The same error shape as the proxy's, so one client library handles both.
        return error_json(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'][1:]) or error['loc'][0]}: {error['msg']}"
            for error in exc.errors()
        )
        return error_json(422, f"Invalid request: {problems}.", param=str(exc.errors()[0]["loc"][-1]))

    return app
