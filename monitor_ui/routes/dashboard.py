"""Dashboard: traffic, latency, tokens and cost over four windows, charts, breakdowns, the pool. Reads rollups only."""

from __future__ import annotations

import math
import time

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from monitor_ui import charts, shapes, views
from monitor_ui.deps import AdminApi, AdminPage, Conn, PageOf, Settings
from monitor_ui.names import names_for, route_names
from storage import capture_status, outcomes, rollups, upstream_keys

router = APIRouter(prefix="/dashboard", tags=["dashboard"])
api = APIRouter(prefix="/api/dashboard", tags=["dashboard"])

# (name, grain, seconds back): the newest buckets of the finer grain for short windows.
WINDOWS = (
    ("last minute", "minute", 60),
    ("last hour", "minute", 3600),
    ("last 24 hours", "hour", 86400),
    ("all time", "hour", None),
)
BREAKDOWNS = (
    ("model", "By model"),
    ("upstream_id", "By upstream"),
    ("group_id", "By group"),
    ("upstream_key_id", "By upstream key"),
    ("client_key_id", "By client key"),
)


def _figures(totals: rollups.Totals) -> dict:
    ms = _ms
    return {
        "requests": totals.requests,
        "errors": totals.errors,
        "success_rate": totals.success_rate,
        "latency_p50_ms": ms(totals.latency_ms(50)),
        "latency_p95_ms": ms(totals.latency_ms(95)),
        "first_byte_p50_ms": ms(totals.first_byte_ms(50)),
        "streamed": totals.streamed,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "cost": round(totals.cost, 6),
    }


def _since(seconds: int | None, grain: str, now: float) -> int | None:
    if seconds is None:
        return None
    # Whole buckets: "last hour" covers the 60 to 61 minutes up to now.
    step = rollups.GRAINS[grain]
    return int((now - seconds) // step) * step


def _ms(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else value


def capture_health(status: capture_status.CaptureStatus, now: float) -> dict:
    """What the dashboard says about capture: flows waiting for a database that refuses them, flows lost."""
    failing = status.failing_now(now)
    return {
        "failing": failing,
        "failing_since": status.failing_since if failing else None,
        "error": status.error if failing else None,
        "waiting": status.waiting if failing else 0,
        "dropped": status.dropped,
        "last_drop_at": status.last_drop_at,
        "last_drop_reason": status.last_drop_reason,
    }


def dashboard_data(conn, now: float, status: capture_status.CaptureStatus | None = None) -> dict:
    windows = [
        {"name": name, **_figures(rollups.totals(conn, grain, _since(seconds, grain, now)))}
        for name, grain, seconds in WINDOWS
    ]
    day = _since(86400, "hour", now)
    breakdowns = {
        dimension: [{"id": value, **_figures(t)} for value, t in rollups.breakdown(conn, day, dimension, 10)]
        for dimension, _ in BREAKDOWNS
    }
    names = names_for(
        conn, [r["id"] for r in breakdowns["upstream_key_id"]], [r["id"] for r in breakdowns["client_key_id"]]
    )
    for row in breakdowns["upstream_key_id"]:
        row["label"] = names.key(row["id"])
    for row in breakdowns["client_key_id"]:
        row["label"] = names.client(row["id"])
    route = route_names(conn)
    for row in breakdowns["upstream_id"]:
        row["label"], row["deleted"] = route.upstream(row["id"]), row["id"] not in route.upstreams
    for row in breakdowns["group_id"]:
        row["label"], row["deleted"] = route.group(row["id"]), row["id"] not in route.groups
    minute_start = int(now // 60) * 60 - 59 * 60
    hour_start = int(now // 3600) * 3600 - 23 * 3600
    minutes = rollups.series_totals(conn, "minute", minute_start)
    hours = rollups.series_totals(conn, "hour", hour_start)
    return {
        "generated_at": now,
        "windows": windows,
        "per_minute": [(b, t.requests, t.errors) for b, t in minutes],
        "per_hour": [(b, t.requests, t.errors) for b, t in hours],
        "latency_per_minute": [(b, _ms(t.latency_ms(50)), _ms(t.latency_ms(95))) for b, t in minutes],
        "tokens_per_minute": [(b, t.prompt_tokens, t.completion_tokens) for b, t in minutes],
        "breakdowns": breakdowns,
        "keys_by_state": upstream_keys.count_by_state(conn),
        "refusals": outcomes.refusals_since(conn, day),  # last 24 hours, by reason (the error code)
        "capture": capture_health(status or capture_status.CaptureStatus(), now),
        "_charts": (minute_start, minutes, hour_start, hours),
    }


@router.get("", response_class=HTMLResponse, dependencies=[AdminPage])
def read_dashboard(page: PageOf, conn: Conn, settings: Settings):
    """Traffic at a glance; refreshes itself every few seconds."""
    data = dashboard_data(conn, time.time(), capture_status.read(settings.db_path))
    minute_start, minutes, hour_start, hours = data.pop("_charts")
    chart_list = [
        charts.requests_chart("minute", "Requests per minute, last hour", minutes, minute_start, 60, 60),
        charts.requests_chart("hour", "Requests per hour, last 24 hours", hours, hour_start, 3600, 24),
        charts.latency_chart("latency", "Latency per minute (p50, p95), last hour", minutes, minute_start, 60, 60),
        charts.tokens_chart("tokens", "Tokens per minute, last hour", minutes, minute_start, 60, 60),
    ]
    context = {
        "data": data,
        "charts": chart_list,
        "breakdown_names": BREAKDOWNS,
        "section": "dashboard",
        "iso": views.iso,
    }
    return page.render("dashboard.html", context)


@api.get("", dependencies=[AdminApi], response_model=shapes.Dashboard, response_model_exclude_unset=True)
def read_dashboard_json(conn: Conn, settings: Settings) -> dict:
    """The dashboard's figures: series are [bucket start, requests, errors], [start, p50, p95] ms, [start, in, out]."""
    data = dashboard_data(conn, time.time(), capture_status.read(settings.db_path))
    data.pop("_charts")
    return data
