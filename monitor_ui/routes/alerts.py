"""Alerts: the list (open and recent) and "send a test alert". The checks run in monitor_ui/alerting.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from pydantic import BaseModel

from monitor_ui import shapes
from monitor_ui.alerting import Alerting
from monitor_ui.deps import AdminApi, AdminApiChange, AdminForm, Conn
from storage import alerts

router = APIRouter(prefix="/alerts", tags=["alerts"])
api = APIRouter(prefix="/api/alerts", tags=["alerts"])


class AlertList(BaseModel):
    open: list[shapes.Alert]
    recent: list[shapes.Alert]  # open and cleared, newest first


class TestDelivery(BaseModel):
    sent: bool
    error: str | None  # why not: no webhook set, or the receiver's HTTP status / the connection's error
    attempts: int


def _alerting(request: Request) -> Alerting:
    return request.app.state.alerting


@api.get("", dependencies=[AdminApi], response_model=AlertList)
def list_alerts(conn: Conn) -> dict:
    """The alerts that hold now, and the latest 50 raised."""
    return {"open": alerts.open_alerts(conn), "recent": alerts.recent_alerts(conn)}


@api.post("/test", dependencies=[AdminApiChange], response_model=TestDelivery)
async def send_test_alert(request: Request) -> dict:
    """Send a test alert to [alerts] webhook_url now; says whether the receiver took it."""
    delivery = await run_in_threadpool(_alerting(request).send_test)
    return {"sent": delivery.ok, "error": delivery.error, "attempts": delivery.attempts}


@router.post("/test", dependencies=[AdminForm])
async def send_test_alert_form(request: Request) -> RedirectResponse:
    """The dashboard's "Send a test alert" button: back to the dashboard, which says how it went."""
    delivery = await run_in_threadpool(_alerting(request).send_test)
    outcome = "sent" if delivery.ok else ("no_webhook" if delivery.attempts == 0 else "failed")
    return RedirectResponse(f"/dashboard?test_alert={outcome}#alerts", status_code=303)
