"""Running a trace probe (docs/traces.md), for the API, the UI's schedule and `run.py traces run`.

A trace's chat request goes through the proxy like any other flow, under the built-in client
"traces" (made when missing; give it limits or a budget with `run.py clients set traces ...`),
pinned to the chosen group with a pass (monitor_ui/through_proxy.py): routed, limited and
captured as every request is. The image URL names the trace listener's public address.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import httpx

from config import Settings
from core import traces as core_traces
from monitor_ui.through_proxy import (
    FLOW_HEADER,
    ProxyTarget,
    ensure_builtin_client,
    last_flow_id,
    open_through_proxy,
    recorded,
)
from storage import audit, db, routes
from storage import traces as trace_store

log = logging.getLogger(__name__)
TRACES_CLIENT = "traces"
TRACE_TIMEOUT = httpx.Timeout(connect=10.0, read=180.0, write=30.0, pool=10.0)
NEW_CLIENT_RETRIES = 10  # 401s retried, half a second apart, while the proxy learns of a new traces client
_running: set[asyncio.Task] = set()  # traces started by the API, kept until they end


class TracesOff(Exception):
    """trace.port is 0: there is no listener for relays to fetch from."""


def public_url(settings: Settings) -> str:
    """Where the outside world reaches the trace listener: trace.public_url, else http://host:port."""
    if settings.trace.public_url:
        return settings.trace.public_url
    host = settings.trace.host
    host = {"0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.trace.port}"


def start(
    conn: sqlite3.Connection, settings: Settings, group: str | int, model: str, scheduled: bool = False
) -> tuple[dict, int]:
    """A new trace of `model` through `group` (UPSTREAM/GROUP or its id), and the traces client's id.

    routes.NotFound for an unknown group; ValueError for a malformed one or an empty model;
    TracesOff while trace.port is 0."""
    if not settings.trace.port:
        raise TracesOff("Traces need the trace listener: set trace.port (and trace.public_url), then restart.")
    model = model.strip()
    if not model or len(model) > 200:
        raise ValueError("model must be a model name (1 to 200 characters)")
    if isinstance(group, int):
        labels = routes.group_labels(conn)
        if group not in labels:
            raise routes.NotFound(f"no group #{group}")
        group_id, label = group, labels[group]
    else:
        group_id, label = routes.group_id_of(conn, group), group.strip()
    client_id = ensure_builtin_client(conn, TRACES_CLIENT)
    return trace_store.create(conn, group_id, label, model, scheduled), client_id


def _with_conn(settings: Settings, work: Callable[[sqlite3.Connection], Any]) -> Any:
    conn = db.connect(settings.storage_path)
    try:
        return work(conn)
    finally:
        conn.close()


async def complete(settings: Settings, trace: dict, client_id: int) -> None:
    """Send the trace's request, keep what the answer names, wait trace.grace_seconds, then finish it."""
    row_id = int(trace["id"])
    url = core_traces.image_url(public_url(settings), trace["trace_id"])
    body = core_traces.request_body(trace["model"], url)
    before = await asyncio.to_thread(last_flow_id, settings.storage_path)
    for attempt in range(NEW_CLIENT_RETRIES + 1):
        if attempt:
            # The traces client made a moment ago reaches the proxy within a second or two (it reloads
            # clients when their revision changes): until then its pass is refused as an unknown client's.
            await asyncio.sleep(0.5)
        sent_at = time.time()
        await asyncio.to_thread(_with_conn, settings, lambda c, at=sent_at: trace_store.mark_sent(c, row_id, at))
        answer, unknown_client, flow_uuid = await _send(settings, client_id, trace["group_id"], body)
        if not unknown_client:
            break
    answered_at = time.time()
    await asyncio.to_thread(_with_conn, settings, lambda c: trace_store.record_answer(c, row_id, answer, answered_at))
    # The proxy names the flow it recorded (x-keyrotor-flow): the trace links that one, not a guess by time.
    flow_row = await recorded(settings.storage_path, flow_uuid, before)
    await asyncio.sleep(settings.trace.grace_seconds)
    await asyncio.to_thread(_with_conn, settings, lambda c: trace_store.finish(c, row_id, flow_row))


async def _send(
    settings: Settings, client_id: int, group_id: int, body: bytes
) -> tuple[core_traces.Answer, bool, str | None]:
    """The proxy's answer, whether it refused the pass (its client unknown to it, so far), and its flow's id."""
    try:
        async with open_through_proxy(
            ProxyTarget.of(settings),
            client_id,
            "POST",
            "/v1/chat/completions",
            body,
            group_id=group_id,
            timeout=TRACE_TIMEOUT,
        ) as response:
            answer = core_traces.read_answer(response.status_code, await response.aread())
            refused = response.status_code == 401 and response.headers.get("x-keyrotor-error") == "invalid_api_key"
            return answer, refused, response.headers.get(FLOW_HEADER)
    except httpx.HTTPError as e:
        error = f"the proxy could not be reached or did not answer: {type(e).__name__}"
        return core_traces.Answer(0, error=error), False, None


def run_in_background(settings: Settings, trace: dict, client_id: int) -> None:
    """complete() as a task of the running loop (the UI's), kept referenced until it ends."""
    task = asyncio.get_running_loop().create_task(complete(settings, trace, client_id))
    _running.add(task)
    task.add_done_callback(_running.discard)


def schedule_entries(settings: Settings) -> list[tuple[str, str]]:
    """trace.schedule as (UPSTREAM/GROUP, MODEL) pairs."""
    entries = []
    for entry in settings.trace.schedule.split(","):
        label, _, model = entry.strip().partition(" ")
        if label and model:
            entries.append((label, model.strip()))
    return entries


async def run_schedule(settings: Settings, every_seconds: float, first_after: float = 60.0) -> None:
    """The UI's background task: each trace.schedule entry, one after another, every `every_seconds`."""
    await asyncio.sleep(first_after)
    while True:
        for label, model in schedule_entries(settings):
            try:
                with audit.acting(audit.Actor(audit.SCHEDULER)):
                    trace, client_id = await asyncio.to_thread(
                        _with_conn, settings, lambda c, label=label, model=model: start(c, settings, label, model, True)
                    )
                await complete(settings, trace, client_id)
            except (routes.NotFound, ValueError, TracesOff, sqlite3.Error) as e:
                log.warning("scheduled trace of %s through %s not run: %s", model, label, e)
        await asyncio.sleep(every_seconds)


def described(conn: sqlite3.Connection, trace: dict, settings: Settings | None = None) -> dict:
    """A trace as the API, the pages and the CLI show it: its row, its fetches and its verdict."""
    fetches = trace_store.fetches_of(conn, int(trace["id"]))
    found = core_traces.verdict(
        trace["model"],
        trace["finished_at"] is not None,
        fetches,
        trace["answer_text"] if trace["answered_at"] is not None else None,
        trace["answer_model"],
        trace["system_fingerprint"],
    )
    verdict = {
        "state": found.state,
        "summary": found.summary,
        "addresses": len(found.fetchers),
        "fetchers": [
            {
                "address": f.address,
                "user_agents": list(f.user_agents),
                "fetches": f.fetches,
                "first_delay_seconds": f.first_delay_seconds,
            }
            for f in found.fetchers
        ],
        "mentions_image": found.mentions_image,
        "model": found.model,
        "system_fingerprint": found.system_fingerprint,
        "model_differs": found.model_differs,
    }
    keep = (
        "id", "group_id", "model", "created_at", "sent_at", "answered_at", "finished_at", "status",
        "answer_model", "system_fingerprint", "answer_text", "error", "flow_id",
    )  # fmt: skip
    shown = {k: trace[k] for k in keep}
    shown["group"] = trace["group_label"]
    shown["scheduled"] = bool(trace["scheduled"])
    shown["image_url"] = core_traces.image_url(public_url(settings), trace["trace_id"]) if settings else None
    return {**shown, "verdict": verdict, "fetches": fetches}


def verdict_lines(trace: dict) -> list[str]:
    """`described(trace)` as `run.py traces run` prints it."""
    v = trace["verdict"]
    lines = [f"trace #{trace['id']}: {trace['model']} through {trace['group']}", f"verdict: {v['summary']}"]
    for f in v["fetchers"]:
        delay = "" if f["first_delay_seconds"] is None else f", first {f['first_delay_seconds']:.2f} s after sending"
        agents = "; ".join(repr(a) for a in f["user_agents"]) or "no user agent"
        lines.append(f"  {f['address']}  {agents}  ({f['fetches']} fetch{'es' if f['fetches'] > 1 else ''}{delay})")
    status = trace["status"]
    lines.append(
        f"answer: {'HTTP ' + str(status) if status else 'none'}" + (f" ({trace['error']})" if trace["error"] else "")
    )
    if v["model"] or v["system_fingerprint"]:
        differs = " (not the model asked for)" if v["model_differs"] else ""
        lines.append(f"  model {v['model'] or '-'}{differs}, system_fingerprint {v['system_fingerprint'] or '-'}")
    if v["mentions_image"] is not None:
        lines.append(f"  mentions the image: {'yes' if v['mentions_image'] else 'no'}")
    return lines
