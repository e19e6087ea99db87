"""Replay and compare (docs/workbench.md): send a recorded flow again through the proxy, compare two flows.

A replay is one more request through the proxy (monitor_ui/through_proxy.py), under the
original flow's client unless the admin names another, so that client's limits and budget
apply. With nothing changed it is pinned where the original went (its group and key; a key
deleted since leaves the group's pool to serve it); another group, key or model replaces those
pins. The body is what the client sent (rebuilt from the record, core/rewrites.py), or the
admin's edit. The new flow is recorded like any other, with `replay_of`, and the replay goes
to the audit log.

Batch replays run as background jobs in the UI process (ReplayJobs): a few hundred flows at a
chosen concurrency; the jobs live in memory only, until the UI restarts.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import worddiff
from core.passes import FLOW_HEADER
from core.rewrites import client_headers, rebuilt_body, request_diff
from monitor_ui import views
from monitor_ui.through_proxy import Target, last_flow_id, open_through_proxy, recorded
from storage import audit, client_keys, db, flows, routes

MAX_BATCH = 500
MAX_CONCURRENCY = 16
KEPT_JOBS = 20


class ReplayRefused(Exception):
    """Why a flow cannot be replayed as asked; `status` is the UI's answer (400, 404, 409)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Asked:
    """What the admin changes: another group (UPSTREAM/GROUP or id), key (id), model, body, client (name or id)."""

    group: str | None = None
    key: int | None = None
    model: str | None = None
    body: str | None = None
    client: str | None = None

    @property
    def reroutes(self) -> bool:
        return bool(self.group or self.key is not None or self.model)


@dataclass(frozen=True)
class Planned:
    """One replay, ready to send."""

    replay_of: int
    client_id: int
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes | None
    group_id: int | None
    key_id: int | None
    changes: dict[str, Any]  # what the admin changed, for the audit log


@dataclass
class Replayed:
    replay_of: int
    id: int | None  # the new flow's row id (None: not recorded in time)
    flow_id: str | None  # mitmproxy's
    status: int


def _client_id(conn: sqlite3.Connection, value: str) -> int:
    value = value.strip()
    row = client_keys.client_by_id(conn, int(value)) if value.isdecimal() else None
    if row is None:
        row = conn.execute("SELECT * FROM clients WHERE name = ?", (value,)).fetchone()
    if row is None:
        raise ReplayRefused(404, f"There is no client {value!r} (a client's name or id).")
    return int(row["id"])


def _group_id(conn: sqlite3.Connection, value: str) -> int:
    value = value.strip()
    if value.isdecimal() and conn.execute("SELECT 1 FROM groups WHERE id = ?", (int(value),)).fetchone():
        return int(value)
    try:
        return routes.group_id_of(conn, value)
    except (routes.NotFound, ValueError):
        raise ReplayRefused(404, f"There is no upstream group {value!r} (UPSTREAM/GROUP, or its id).") from None


def client_body(row: dict[str, Any]) -> str | None:
    """What the client sent as its body, rebuilt from the record (None: it cannot be)."""
    kept = _client_request(row)
    if row.get("request_body_truncated") or row.get("request_body_type"):
        return None  # cut short, or not text (an upload): only an edited body can be sent
    body = rebuilt_body(row.get("request_body"), kept.get("body") if kept else None)
    if body is not None and kept is None and row.get("model"):
        body = _with_model(body, row["model"]) or body  # recorded before client_request: the client's model
    return body


def _client_request(row: dict[str, Any]) -> dict[str, Any] | None:
    kept = row.get("client_request")
    if isinstance(kept, str):
        kept = json.loads(kept)
    return kept if isinstance(kept, dict) else None


def _with_model(body: str, model: str) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    document["model"] = model
    return json.dumps(document, ensure_ascii=False)


def plan(conn: sqlite3.Connection, flow_row_id: int, asked: Asked) -> Planned:
    """The replay of flow `flow_row_id` as `asked`, or why not (ReplayRefused)."""
    row = flows.get_flow(conn, flow_row_id)
    if row is None:
        raise ReplayRefused(404, f"No flow with id {flow_row_id}.")
    if row.get("websocket_messages"):
        raise ReplayRefused(409, "A WebSocket session (Realtime) cannot be sent again.")
    client_id = _client_id(conn, asked.client) if asked.client else row.get("client_id")
    if client_id is None:
        raise ReplayRefused(409, "This flow has no client (it was refused before one was known): name one in client.")
    if client_keys.client_by_id(conn, int(client_id)) is None:
        raise ReplayRefused(409, f"This flow's client (#{client_id}) has been deleted: name another in client.")
    kept = _client_request(row)
    path = (kept or {}).get("path") or row["path"]
    body = asked.body if asked.body is not None else client_body(row)
    if body is None and row["method"] not in ("GET", "DELETE"):
        raise ReplayRefused(
            409,
            "This flow's body was not kept whole (truncated, or not text): send the body to replay in body.",
        )
    if asked.model:
        body = _with_model(body or "", asked.model)
        if body is None:
            raise ReplayRefused(400, "model can only be changed in a JSON body with a top-level model.")
    group_id = _group_id(conn, asked.group) if asked.group else None
    key_id = asked.key
    if key_id is not None and not conn.execute("SELECT 1 FROM upstream_keys WHERE id = ?", (key_id,)).fetchone():
        raise ReplayRefused(404, f"There is no upstream key #{key_id}.")
    if not asked.reroutes:  # sent again where it went: its group, and its key (gone: the group's pool)
        exists = conn.execute("SELECT 1 FROM groups WHERE id = ?", (row.get("group_id"),)).fetchone()
        group_id = row.get("group_id") if exists else None
        key_id = row.get("upstream_key_id")
    recorded_headers = row.get("request_headers") or "[]"
    headers = client_headers(
        json.loads(recorded_headers) if isinstance(recorded_headers, str) else recorded_headers, kept
    )
    changes = {
        k: v
        for k, v in {
            "group": asked.group,
            "key": asked.key,
            "model": asked.model,
            "client": asked.client,
            "body_edited": asked.body is not None or None,
        }.items()
        if v is not None
    }
    return Planned(
        flow_row_id,
        int(client_id),
        row["method"],
        path,
        headers,
        body.encode() if body is not None else None,
        group_id,
        key_id,
        changes,
    )


async def send(settings: Target, planned: Planned) -> Replayed:
    """Send the replay through the proxy, read its answer to the end (a stream as it streams), and
    find its record."""
    before = await asyncio.to_thread(last_flow_id, settings.db_path)
    async with open_through_proxy(
        settings,
        planned.client_id,
        planned.method,
        planned.path,
        planned.body,
        headers=planned.headers,
        group_id=planned.group_id,
        key_id=planned.key_id,
        replay_of=planned.replay_of,
    ) as response:
        async for _ in response.aiter_raw():
            pass
        status, flow_id = response.status_code, response.headers.get(FLOW_HEADER)
    return Replayed(planned.replay_of, await recorded(settings.db_path, flow_id, before), flow_id, status)


def audit_replay(db_path: Path, planned: Planned, replayed: Replayed, actor: audit.Actor | None) -> None:
    conn = db.connect(db_path)
    try:
        with conn:
            details = {"replay": replayed.id, "status": replayed.status, "client_id": planned.client_id}
            audit.record(conn, "flows.replay", f"flow #{planned.replay_of}", details | planned.changes, actor)
    finally:
        conn.close()


async def replay(settings: Target, flow_row_id: int, asked: Asked) -> Replayed:
    """Plan, send, record and audit one replay (ReplayRefused when it cannot be sent)."""
    actor = audit.current_actor()
    planned = await asyncio.to_thread(_plan_on_own_connection, settings.db_path, flow_row_id, asked)
    replayed = await send(settings, planned)
    await asyncio.to_thread(audit_replay, settings.db_path, planned, replayed, actor)
    return replayed


def _plan_on_own_connection(db_path: Path, flow_row_id: int, asked: Asked) -> Planned:
    conn = db.connect(db_path, readonly=True)
    try:
        return plan(conn, flow_row_id, asked)
    finally:
        conn.close()


# --------------------------------------------------------------------------- compare


def text_of(row: dict[str, Any]) -> str | None:
    """The assistant's text of a flow's answer: reassembled from a stream's events, or read from a whole one."""
    if row.get("stream"):
        return views.streamed_text(row.get("response_body"))
    return worddiff.answer_text(worddiff.parsed(row.get("response_body")))


def _shown(value: Any) -> Any:
    return None if value is worddiff.MISSING else value


def _json_changes(a: str | None, b: str | None) -> list[dict[str, Any]]:
    changes = worddiff.json_changes(worddiff.parsed(a), worddiff.parsed(b))
    return [{"path": c.path, "kind": c.kind, "a": _shown(c.a), "b": _shown(c.b)} for c in changes]


def _header_changes(a: list[list[str]], b: list[list[str]]) -> list[dict[str, Any]]:
    left = {n.lower(): v for n, v in a}
    right = {n.lower(): v for n, v in b}
    names = [n for n in list(left) + [n for n in right if n not in left] if n != FLOW_HEADER]
    return [{"name": n, "a": left.get(n), "b": right.get(n)} for n in names if left.get(n) != right.get(n)]


FACTS = ("status", "model", "fallback_model", "duration_ms", "time_to_first_byte_ms", "prompt_tokens")
MORE_FACTS = ("completion_tokens", "total_tokens", "cost", "group_id", "upstream_key_id", "client_id", "error")


def side(row: dict[str, Any]) -> dict[str, Any]:
    """What a compare view shows of one flow."""
    detail = views.flow_detail(row)  # type: ignore[arg-type]
    return {
        "id": row["id"],
        "method": row["method"],
        "path": row["path"],
        "stream": bool(row["stream"]),
        "replay_of": row.get("replay_of"),
        **{name: detail.get(name) for name in FACTS + MORE_FACTS},
        "text": text_of(row),
    }


def compare(row_a: dict[str, Any], row_b: dict[str, Any]) -> dict[str, Any]:
    """Two flows side by side: facts, header and JSON body changes, and the word diff of their answers."""
    a, b = side(row_a), side(row_b)
    facts = [{"name": n, "a": a[n], "b": b[n], "same": a[n] == b[n]} for n in FACTS + MORE_FACTS]
    text_a, text_b = a.pop("text"), b.pop("text")
    runs = worddiff.word_diff(text_a or "", text_b or "")
    headers = {
        side_name: _header_changes(
            json.loads(row_a[f"{side_name}_headers"] or "[]"), json.loads(row_b[f"{side_name}_headers"] or "[]")
        )
        for side_name in ("request", "response")
    }
    bodies = {
        "request": _json_changes(
            client_body(row_a) or row_a.get("request_body"), client_body(row_b) or row_b.get("request_body")
        ),
        "response": []
        if row_a["stream"] or row_b["stream"]
        else _json_changes(row_a.get("response_body"), row_b.get("response_body")),
    }
    return {
        "a": a,
        "b": b,
        "facts": facts,
        "text": {
            "a": text_a,
            "b": text_b,
            "identical": text_a == text_b,
            "similarity": worddiff.similarity(runs),
            "diff": [{"op": r.op.value, "text": r.text} for r in runs],
        },
        "headers": headers,
        "bodies": bodies,
    }


def flow_request_diff(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The flow page's "what keyrotor changed on the way" (core/rewrites.py)."""
    headers = row.get("request_headers") or "[]"
    changes = request_diff(
        row["method"],
        row["path"],
        json.loads(headers) if isinstance(headers, str) else headers,
        row.get("request_body"),
        _client_request(row),
    )
    return [{"where": c.where, "name": c.name, "client": c.client, "sent": c.sent, "kind": c.kind} for c in changes]


def replays_of(conn: sqlite3.Connection, flow_row_id: int, limit: int = 50) -> list[dict[str, Any]]:
    """The latest flows that sent flow `flow_row_id` again."""
    rows = conn.execute(
        "SELECT id, status, started_at FROM flows WHERE replay_of = ? ORDER BY id DESC LIMIT ?", (flow_row_id, limit)
    ).fetchall()
    return [{"id": r["id"], "status": r["status"], "started_at": views.iso(r["started_at"])} for r in rows]


# --------------------------------------------------------------------------- batches


@dataclass
class JobRow:
    original: int
    replay: int | None = None
    status_a: int | None = None
    status_b: int | None = None
    ms_a: float | None = None
    ms_b: float | None = None
    tokens_a: int | None = None
    tokens_b: int | None = None
    text: str = ""  # identical, different, none (no text on either side)
    error: str | None = None


@dataclass
class Job:
    id: str
    total: int
    group: str | None
    model: str | None
    concurrency: int
    created_at: float = field(default_factory=time.time)
    done: int = 0
    state: str = "running"  # running, finished
    rows: list[JobRow] = field(default_factory=list)
    task: asyncio.Task | None = field(default=None, repr=False)

    def status(self) -> dict[str, Any]:
        rows = [r.__dict__ for r in self.rows]
        changed = sum(1 for r in self.rows if r.replay is not None and r.status_a != r.status_b)
        different = sum(1 for r in self.rows if r.text == "different")
        return {
            "id": self.id,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "group": self.group,
            "model": self.model,
            "concurrency": self.concurrency,
            "created_at": views.iso(self.created_at),
            "summary": {
                "status_changed": changed,
                "text_different": different,
                "text_identical": sum(1 for r in self.rows if r.text == "identical"),
                "errors": sum(1 for r in self.rows if r.error),
            },
            "rows": rows,
        }


def _job_row(db_path: Path, original: int, replayed: Replayed) -> JobRow:
    conn = db.connect(db_path, readonly=True)
    try:
        a = flows.get_flow(conn, original)
        b = flows.get_flow(conn, replayed.id) if replayed.id is not None else None
    finally:
        conn.close()
    row = JobRow(original, replayed.id, status_b=replayed.status)
    if a is not None:
        row.status_a, row.ms_a, row.tokens_a = a["status"], a["duration_ms"], a["total_tokens"]
    if b is not None:
        row.status_b, row.ms_b, row.tokens_b = b["status"], b["duration_ms"], b["total_tokens"]
    text_a = text_of(a) if a is not None else None
    text_b = text_of(b) if b is not None else None
    row.text = "none" if text_a is None and text_b is None else ("identical" if text_a == text_b else "different")
    return row


class ReplayJobs:
    """Batch replays of the UI process, by id; the last KEPT_JOBS are kept."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def start(self, settings: Target, ids: list[int], asked: Asked, concurrency: int) -> Job:
        job = Job(secrets.token_hex(8), len(ids), asked.group, asked.model, concurrency)
        finished = [j for j in self.jobs.values() if j.state != "running"]
        for old in finished[: max(0, len(self.jobs) - KEPT_JOBS + 1)]:
            self.jobs.pop(old.id, None)
        self.jobs[job.id] = job
        job.task = asyncio.create_task(self._run(settings, job, ids, asked))
        return job

    @staticmethod
    async def _run(settings: Target, job: Job, ids: list[int], asked: Asked) -> None:
        gate = asyncio.Semaphore(job.concurrency)

        async def one(original: int) -> None:
            async with gate:
                try:
                    replayed = await replay(settings, original, asked)
                    row = await asyncio.to_thread(_job_row, settings.db_path, original, replayed)
                except ReplayRefused as e:
                    row = JobRow(original, error=e.message)
                except Exception as e:  # one flow's trouble (the proxy down, say) is that row's, not the job's
                    row = JobRow(original, error=f"{type(e).__name__}: {e}"[:300])
                job.rows.append(row)
                job.done += 1

        try:
            await asyncio.gather(*(one(i) for i in ids))
        finally:
            job.rows.sort(key=lambda r: r.original)
            job.state = "finished"
