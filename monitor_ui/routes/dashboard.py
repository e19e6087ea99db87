"""Dashboard: traffic, latency, tokens and cost over four windows, charts and breakdowns over a chosen time
range, spend per day, the pool, alerts. Reads rollups only (and the alerts table), never the flows."""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from monitor_ui import charts, shapes, views
from monitor_ui.deps import AdminApi, AdminPage, Conn, PageOf, Settings
from monitor_ui.filters import parse_time, query_link
from monitor_ui.names import names_for, route_names
from monitor_ui.ranges import RANGE_NAMES, TimeRange, time_range
from storage import alerts, capture_status, outcomes, redis_shared, rollups, upstream_keys

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


SPEND_DAYS = 30
# The spend table's dimensions: its query parameter's value → the rollups' dimension (client: its keys' rows summed).
SPEND_BY = {"client": "client_key_id", "key": "upstream_key_id", "model": "model", "group": "group_id"}


# Days before today do not change: their figures are read once per process and day (and again after
# PAST_DAYS_TTL, for the odd flow that ended after midnight); only today's hours are read on every refresh.
PAST_DAYS_TTL = 600.0
_past_days: dict[tuple[str, str, int], tuple[float, dict]] = {}


def _spend_days(conn: sqlite3.Connection, dimension: str, first: int, today: int, now: float) -> dict:
    """rollups.spend_per_day over [first, now], the days before `today` from the cache."""
    database = conn.execute("PRAGMA database_list").fetchone()[2] or str(id(conn))
    key = (database, dimension, first)
    cached = _past_days.get(key)
    if cached is None or now - cached[0] > PAST_DAYS_TTL:
        if len(_past_days) > 100:
            _past_days.clear()
        cached = _past_days[key] = (now, rollups.spend_per_day(conn, dimension, first, today))
    merged: dict = {value: dict(per_day) for value, per_day in cached[1].items()}
    for value, per_day in rollups.spend_per_day(conn, dimension, today).items():
        merged.setdefault(value, {}).update(per_day)
    return merged


def spend_per_day(conn: sqlite3.Connection, now: float) -> dict:
    """Estimated cost per UTC day of the last 30 days, in total and per client, key, model and group (hour rollups)."""
    today = int(now // 86400) * 86400
    first = today - (SPEND_DAYS - 1) * 86400
    days = [first + i * 86400 for i in range(SPEND_DAYS)]
    total = _spend_days(conn, rollups.ALL, first, today, now).get(None, {})
    by: dict[str, list[dict]] = {}
    route = route_names(conn)
    for name, dimension in SPEND_BY.items():
        found = _spend_days(conn, dimension, first, today, now)
        rows = [
            {"id": value, "per_day": {day: cost for day, (cost, _) in per_day.items()}}
            for value, per_day in found.items()
        ]
        rows = _per_client(conn, rows) if name == "client" else _costliest(rows)
        if name == "key":
            labels = names_for(conn, [r["id"] for r in rows])
            for row in rows:
                row["label"] = labels.key(row["id"])
        elif name == "group":
            for row in rows:
                row["label"] = route.group(row["id"])
        for row in rows:
            row.setdefault("label", row["id"])
            row["total"] = round(sum(row["per_day"].values()), 6)
            row["days"] = [round(row["per_day"].get(day, 0.0), 6) for day in days]
            del row["per_day"]
        by[name] = rows
    return {
        "days": days,
        "total": [round(total.get(day, (0.0, 0))[0], 6) for day in days],
        "requests": [total.get(day, (0.0, 0))[1] for day in days],
        "by": by,
    }


def _costliest(rows: list[dict], count: int = 10) -> list[dict]:
    return sorted(rows, key=lambda r: -sum(r["per_day"].values()))[:count]


def _per_client(conn: sqlite3.Connection, rows: list[dict]) -> list[dict]:
    """Rows per client key summed per client (a key never moves between clients), the 10 that cost most."""
    key_ids = [r["id"] for r in rows if r["id"] is not None]
    owners: dict[int, tuple[int, str]] = {}
    if key_ids:
        marks = ",".join("?" * len(key_ids))
        for key_id, client_id, name in conn.execute(
            "SELECT k.id, c.id, c.name FROM client_keys k JOIN clients c ON c.id = k.client_id"
            f" WHERE k.id IN ({marks})",
            key_ids,
        ):
            owners[key_id] = (client_id, name)
    clients: dict[int | None, dict] = {}
    for row in rows:
        client_id, name = owners.get(row["id"], (None, None)) if row["id"] is not None else (None, None)
        if row["id"] is not None and client_id is None:
            client_id, name = -row["id"], f"key #{row['id']} (deleted)"
        entry = clients.setdefault(client_id, {"id": client_id, "label": name, "per_day": {}})
        for day, cost in row["per_day"].items():
            entry["per_day"][day] = entry["per_day"].get(day, 0.0) + cost
    return _costliest(list(clients.values()))


def dashboard_data(
    conn, now: float, status: capture_status.CaptureStatus | None = None, shown: TimeRange | None = None
) -> dict:
    shown = shown or time_range(None, None, None, now)
    windows = [
        {"name": name, **_figures(rollups.totals(conn, grain, _since(seconds, grain, now)))}
        for name, grain, seconds in WINDOWS
    ]
    day = _since(86400, "hour", now)
    # Breakdowns read hour rows: the range's hours, the partly covered first one included.
    since_hour, until = int(shown.since // 3600) * 3600, (None if shown.name != "custom" else shown.until)
    breakdowns = {
        dimension: [
            {"id": value, **_figures(t)} for value, t in rollups.breakdown(conn, since_hour, dimension, 10, until)
        ]
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
    step = shown.step if shown.grain == "day" else None
    ranged = rollups.series_totals(conn, shown.rollup_grain, shown.start, shown.until, step)
    spend = spend_per_day(conn, now)
    spend_first = spend["days"][0]
    spend_buckets = [
        (day, rollups.Totals(requests, 0, 0, 0, 0, cost, 0.0, [], []))
        for day, cost, requests in zip(spend["days"], spend["total"], spend.pop("requests"), strict=True)
        if requests or cost
    ]
    return {
        "generated_at": now,
        "range": {
            "name": shown.name,
            "label": shown.label,
            "since": shown.since,
            "until": shown.until,
            "grain": shown.grain,
            "step_seconds": shown.step,
        },
        "series": [(b, t.requests, t.errors) for b, t in ranged],
        "latency_series": [(b, _ms(t.latency_ms(50)), _ms(t.latency_ms(95))) for b, t in ranged],
        "tokens_series": [(b, t.prompt_tokens, t.completion_tokens) for b, t in ranged],
        "cost_series": [(b, round(t.cost, 6)) for b, t in ranged],
        "spend_per_day": spend,
        "alerts": alerts.open_alerts(conn),
        "windows": windows,
        "per_minute": [(b, t.requests, t.errors) for b, t in minutes],
        "per_hour": [(b, t.requests, t.errors) for b, t in hours],
        "latency_per_minute": [(b, _ms(t.latency_ms(50)), _ms(t.latency_ms(95))) for b, t in minutes],
        "tokens_per_minute": [(b, t.prompt_tokens, t.completion_tokens) for b, t in minutes],
        "breakdowns": breakdowns,
        "keys_by_state": upstream_keys.count_by_state(conn),
        "refusals": outcomes.refusals_since(conn, day),  # last 24 hours, by reason (the error code)
        "capture": capture_health(status or capture_status.CaptureStatus(), now),
        "_charts": (shown, ranged, spend_first, spend_buckets),
    }


RangeName = Annotated[
    str | None, Query(alias="range", max_length=8, description="1h, 24h (the default), 7d or 30d back from now")
]
Since = Annotated[str | None, Query(max_length=40, description="a custom range's start (ISO date/time, UTC)")]
Until = Annotated[str | None, Query(max_length=40, description="a custom range's end (default: now)")]
SpendBy = Annotated[str, Query(pattern="^(client|key|model|group)$", description="the spend table's rows")]


def _range(name: str | None, since: str | None, until: str | None, now: float) -> TimeRange:
    return time_range(name, parse_time(since, "since"), parse_time(until, "until"), now)


def _flows_range(shown: TimeRange, chosen: bool) -> dict[str, str]:
    """What the breakdowns' links add so the flows page lists the same range (nothing for the default)."""
    if not chosen:
        return {}
    if shown.name != "custom":
        return {"range": shown.name}
    return {"since": views.iso(shown.since) or "", "until": views.iso(shown.until) or ""}


def _spark(costs: list[float], days: list[int]) -> list[tuple[int, float, float, str]]:
    """A row's bars of spend per day in a 150 x 20 px box: (x, y, height, tip), days without spend left out."""
    peak = max(costs, default=0) or 1
    bars = []
    for index, (day, cost) in enumerate(zip(days, costs, strict=True)):
        if cost > 0:
            height = round(18 * cost / peak, 1)
            label = datetime.fromtimestamp(day, UTC).strftime("%Y-%m-%d")
            bars.append((index * 5, round(20 - height, 1), height, f"{label}: ${cost:.4f}"))
    return bars


def _unit(shown: TimeRange) -> str:
    return {"minute": "minute", "hour": "hour", "day": "day"}[shown.grain]


@router.get("", response_class=HTMLResponse, dependencies=[AdminPage])
def read_dashboard(
    page: PageOf,
    conn: Conn,
    settings: Settings,
    range_name: RangeName = None,
    since: Since = None,
    until: Until = None,
    spend_by: SpendBy = "client",
    test_alert: Annotated[str | None, Query(max_length=20, include_in_schema=False)] = None,
):
    """Traffic at a glance over the chosen range; refreshes itself every few seconds."""
    now = time.time()
    chosen = {"range": range_name or "", "since": since or "", "until": until or "", "spend_by": spend_by}
    shown = _range(range_name, since, until, now)
    data = dashboard_data(conn, now, capture_status.read(settings.db_path), shown)
    data["redis"] = redis_shared.view(settings.redis_url, settings.db_path, now)
    _, ranged, spend_first, spend_buckets = data.pop("_charts")
    unit, label = _unit(shown), shown.label
    start, step, count = shown.start, shown.step, shown.count
    chart_list = [
        charts.requests_chart(shown.grain, f"Requests per {unit}, {label}", ranged, start, step, count),
        charts.latency_chart("latency", f"Latency per {unit} (p50, p95), {label}", ranged, start, step, count),
        charts.tokens_chart("tokens", f"Tokens per {unit}, {label}", ranged, start, step, count),
        charts.spend_chart("spend", "Estimated spend per day, last 30 days", spend_buckets, spend_first, 86400, 30),
    ]
    picker = {
        "ranges": RANGE_NAMES,
        "current": shown.name,
        "since": views.iso(shown.since)[:16] if shown.name == "custom" else "",
        "until": views.iso(shown.until)[:16] if shown.name == "custom" and until else "",
    }
    context = {
        "data": data,
        "charts": chart_list,
        "breakdown_names": BREAKDOWNS,
        "section": "dashboard",
        "iso": views.iso,
        "picker": picker,
        "spend_by": spend_by,
        "refresh": "/dashboard?" + query_link(chosen),
        "link": lambda **extra: query_link(chosen, **extra),
        "test_alert": test_alert,
        "sparks": [_spark(row["days"], data["spend_per_day"]["days"]) for row in data["spend_per_day"]["by"][spend_by]],
        "flows_range": _flows_range(shown, chosen=bool(range_name or since or until)),
    }
    return page.render("dashboard.html", context)


@api.get("", dependencies=[AdminApi], response_model=shapes.Dashboard, response_model_exclude_unset=True)
def read_dashboard_json(
    conn: Conn, settings: Settings, range_name: RangeName = None, since: Since = None, until: Until = None
) -> dict:
    """The dashboard's figures: series are [bucket start, requests, errors], [start, p50, p95] ms, [start, in, out];
    `series`, `latency_series`, `tokens_series` and `cost_series` and the breakdowns follow `range` or since/until."""
    now = time.time()
    data = dashboard_data(conn, now, capture_status.read(settings.db_path), _range(range_name, since, until, now))
    data.pop("_charts")
    redis = redis_shared.view(settings.redis_url, settings.db_path, now)
    if redis is not None:
        data["redis"] = asdict(redis)
    return data
