"""Prometheus text format at /metrics, built from the rollups (no scan of the flows table)."""

from __future__ import annotations

import hmac
import time

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from monitor_ui.auth import SESSION_COOKIE
from monitor_ui.deps import Conn, Settings, Signer, Throttle, UiSettings, admin_key_checked
from monitor_ui.names import key_label, route_names
from storage import audit, capture_status, client_keys, outcomes, redis_shared, rollups, upstream_keys

router = APIRouter(prefix="/metrics", tags=["metrics"])


def _label(value: object) -> str:
    # Model names come from request bodies: escape as the exposition format requires.
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


DIMENSION_FAMILIES = (
    ("model", "model", "keyrotor"),
    ("upstream_key_id", "upstream_key", "keyrotor_upstream_key"),
    ("client_key_id", "client", "keyrotor_client"),
    ("upstream_id", "upstream", "keyrotor_upstream"),  # labelled by name: there are few, and names are unique
    ("group_id", "group", "keyrotor_group"),  # labelled UPSTREAM/GROUP
)


# A flow without a model or a key (refused before one was picked) is counted under this value:
# an empty label value would read as no label at all.
NONE = "(none)"


def _labels(**labels: object) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def render_metrics(
    conn,
    status: capture_status.CaptureStatus | None = None,
    now: float = 0.0,
    redis: redis_shared.RedisView | None = None,
) -> str:
    lines = []

    def family(name: str, kind: str, text: str) -> None:
        lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])

    # One family per dimension (model, upstream key, client, upstream, group), each labelled by
    # that dimension alone: summing a family gives the total, and the label sets stay small.
    route = route_names(conn)
    named = {"upstream_id": route.upstream, "group_id": route.group}
    for dimension, label, prefix in DIMENSION_FAMILIES:
        name_of = named.get(dimension, lambda value: value)
        per_value = [
            ({label: NONE if value is None else name_of(value)}, t)
            for value, t in rollups.breakdown(conn, None, dimension, None)
        ]
        family(f"{prefix}_requests_total", "counter", f"Requests through the proxy, by {label}.")
        lines += [f"{prefix}_requests_total{_labels(**labels)} {t.requests}" for labels, t in per_value]
        family(f"{prefix}_errors_total", "counter", f"Requests answered >= 400 or not at all, by {label}.")
        lines += [f"{prefix}_errors_total{_labels(**labels)} {t.errors}" for labels, t in per_value]
        family(f"{prefix}_tokens_total", "counter", f"Tokens reported by upstream, by {label} and kind.")
        for labels, t in per_value:
            lines.append(f"{prefix}_tokens_total{_labels(**labels, kind='prompt')} {t.prompt_tokens}")
            lines.append(f"{prefix}_tokens_total{_labels(**labels, kind='completion')} {t.completion_tokens}")
        family(f"{prefix}_cost_usd_total", "counter", f"Estimated cost from prices.toml, by {label}.")
        lines += [f"{prefix}_cost_usd_total{_labels(**labels)} {t.cost:.6f}" for labels, t in per_value]

    total = rollups.totals(conn, "hour", None)
    family("keyrotor_request_duration_seconds", "histogram", "Time from request start to response end.")
    cumulative = 0
    for bound, count in zip((*rollups.BUCKETS_MS, None), total.latency, strict=True):
        cumulative += count
        le = "+Inf" if bound is None else f"{bound / 1000:g}"
        lines.append(f'keyrotor_request_duration_seconds_bucket{{le="{le}"}} {cumulative}')
    lines.append(f"keyrotor_request_duration_seconds_sum {total.duration_ms / 1000:.3f}")
    lines.append(f"keyrotor_request_duration_seconds_count {cumulative}")

    family("keyrotor_upstream_keys", "gauge", "Upstream keys per state.")
    lines += [f"keyrotor_upstream_keys{_labels(state=s)} {n}" for s, n in upstream_keys.count_by_state(conn).items()]

    counted = outcomes.totals(conn)
    family(
        "keyrotor_attempts_total", "counter", "Attempts sent upstream, by outcome (a retried request makes several)."
    )
    lines += [f"keyrotor_attempts_total{_labels(outcome=o)} {n}" for o, n in sorted(counted[outcomes.ATTEMPT].items())]
    family("keyrotor_retries_total", "counter", "Attempts after a request's first, each on another key.")
    lines.append(f"keyrotor_retries_total {sum(counted[outcomes.RETRY].values())}")
    family("keyrotor_refusals_total", "counter", "Requests keyrotor answered itself, by reason (x-keyrotor-error).")
    lines += [f"keyrotor_refusals_total{_labels(reason=r)} {n}" for r, n in sorted(counted[outcomes.REFUSAL].items())]

    # Names join the id-labelled families in a query: keyrotor_upstream_key_requests_total * on(upstream_key)
    # group_left(name) keyrotor_upstream_key_info. Kept apart so renaming a key does not start new series.
    family("keyrotor_upstream_key_info", "gauge", "Each upstream key's name as the UI shows it: name (…last four).")
    after = 0
    while rows := upstream_keys.list_keys(conn, 1000, after):
        for row in rows:
            name = key_label(row["id"], row["name"], row["last4"])
            lines.append(f"keyrotor_upstream_key_info{_labels(upstream_key=row['id'], name=name)} 1")
        after = rows[-1]["id"]
    family("keyrotor_client_info", "gauge", "Each client's name.")
    lines += [
        f"keyrotor_client_info{_labels(client=r['id'], name=r['name'])} 1" for r in client_keys.list_clients(conn)
    ]

    # From the capture writer's status file: the counts above miss exactly these flows.
    status = status or capture_status.CaptureStatus()
    failing = status.failing_now(now)
    family("keyrotor_capture_dropped_total", "counter", "Flows the proxy could not store and gave up on.")
    lines.append(f"keyrotor_capture_dropped_total {status.dropped}")
    family("keyrotor_capture_waiting", "gauge", "Flows held in memory because the database refuses writes.")
    lines.append(f"keyrotor_capture_waiting {status.waiting if failing else 0}")
    family("keyrotor_capture_failing", "gauge", "1 while the proxy cannot write to the database.")
    lines.append(f"keyrotor_capture_failing {int(failing)}")
    if redis is not None:  # [redis] url is set (docs/redis.md)
        family("keyrotor_redis_up", "gauge", "1 while Redis answers the UI and every node; 0 while nodes count alone.")
        lines.append(f"keyrotor_redis_up {int(redis.up)}")
        family("keyrotor_redis_errors_total", "counter", "Failed Redis calls, summed over the running nodes.")
        lines.append(f"keyrotor_redis_errors_total {redis.errors}")
        family("keyrotor_redis_nodes_down", "gauge", "Running nodes that cannot reach Redis (on their local view).")
        lines.append(f"keyrotor_redis_nodes_down {redis.nodes_down}")
    return "\n".join(lines) + "\n"


@router.get("", response_class=PlainTextResponse)
async def read_metrics(
    request: Request, conn: Conn, signer: Signer, settings: Settings, throttle: Throttle
) -> PlainTextResponse:
    """Counters, latency histogram and key states for Prometheus: the admin key, a session, or the metrics token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    metrics_token = settings.metrics_token
    allowed = (metrics_token and token and hmac.compare_digest(token, metrics_token)) or await run_in_threadpool(
        signer.valid_session, request.cookies.get(SESSION_COOKIE)
    )
    # A token that is neither the metrics token nor the admin key is a guess at the admin key.
    if not allowed and not (
        token and await admin_key_checked(request, signer, throttle, settings, token, audit.ADMIN_API)
    ):
        raise HTTPException(401, "Send the metrics token (ui.metrics_token) or the admin key as a Bearer token.")
    return await run_in_threadpool(_metrics, conn, settings)


def _metrics(conn, settings: UiSettings) -> PlainTextResponse:
    status = capture_status.read(settings.db_path)
    now = time.time()
    redis = redis_shared.view(settings.redis_url, settings.db_path, now)
    return PlainTextResponse(render_metrics(conn, status, now, redis), media_type="text/plain; version=0.0.4")
