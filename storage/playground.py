"""The chat playground's conversations and turns (docs/playground.md).

A turn names the flow that carried it by mitmproxy's flow id (the proxy's x-keyrotor-flow
answer header); its row id is found once the proxy's writer has stored it, after `flows_before`.
Deleting a conversation deletes its turns; its flows stay, like every captured flow (unlinked).
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from typing import Any

from core.playground import Turn, title_of
from storage import audit

PAGE_LIMIT = 200
FLOW_SEARCH_ROWS = 100_000  # a turn's flow is among this many flows stored after it was sent, or not stored
TURN_LIMIT = 500  # turns shown of one conversation (and sent again as its history)
FLOW_COLUMNS = (
    "f.id AS flow_row_id, f.status AS flow_status, f.model AS flow_model, f.prompt_tokens, f.completion_tokens,"
    " f.total_tokens, f.cost, f.duration_ms, (f.first_byte_at - f.started_at) * 1000 AS first_byte_ms"
)


class NotFound(Exception):
    """No such conversation."""


def new_id() -> str:
    return "pg-" + secrets.token_hex(8)


def create_conversation(
    conn: sqlite3.Connection,
    prompt: str,
    client_id: int,
    model: str,
    group_id: int | None,
    system: str | None,
) -> str:
    conversation_id, now = new_id(), time.time()
    with conn:
        conn.execute(
            "INSERT INTO playground_conversations (id, title, client_id, model, group_id, system, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (conversation_id, title_of(prompt), client_id, model, group_id, system, now, now),
        )
    return conversation_id


def conversation(conn: sqlite3.Connection, conversation_id: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM playground_conversations WHERE id = ?", (conversation_id,)).fetchone()
    if row is None:
        raise NotFound(f"There is no playground conversation {conversation_id!r} (deleted, or never made).")
    return row


def turns_of(conn: sqlite3.Connection, conversation_id: str) -> list[Turn]:
    rows = conn.execute(
        "SELECT prompt, answer FROM playground_turns WHERE conversation_id = ? ORDER BY id LIMIT ?",
        (conversation_id, TURN_LIMIT),
    )
    return [Turn(r["prompt"], r["answer"]) for r in rows]


def start_turn(
    conn: sqlite3.Connection,
    conversation_id: str,
    prompt: str,
    *,
    client_id: int,
    model: str,
    group_id: int | None,
    system: str | None,
    stream: bool,
) -> int:
    """A turn sent now (its answer comes with finish_turn); the conversation takes the latest settings."""
    now = time.time()
    flows_before = conn.execute("SELECT coalesce(max(id), 0) FROM flows").fetchone()[0]
    with conn:
        cursor = conn.execute(
            "INSERT INTO playground_turns (conversation_id, prompt, model, stream, flows_before, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (conversation_id, prompt, model, int(stream), flows_before, now),
        )
        conn.execute(
            "UPDATE playground_conversations SET client_id = ?, model = ?, group_id = ?, system = ?, updated_at = ?"
            " WHERE id = ?",
            (client_id, model, group_id, system, now, conversation_id),
        )
        changes = {"model": model, "client_id": client_id, "group_id": group_id, "stream": stream}
        audit.record(conn, "playground.chat", conversation_id, changes)
    return int(cursor.lastrowid or 0)


def finish_turn(
    conn: sqlite3.Connection,
    turn_id: int,
    *,
    status: int | None,
    flow_id: str | None,
    answer: str | None,
    error: str | None,
) -> None:
    with conn:
        conn.execute(
            "UPDATE playground_turns SET status = ?, flow_id = ?, answer = ?, error = ?, ended_at = ? WHERE id = ?",
            (status, flow_id, answer, error, time.time(), turn_id),
        )


def list_conversations(conn: sqlite3.Connection, limit: int = PAGE_LIMIT) -> list[sqlite3.Row]:
    """The newest conversations first, each with its number of turns."""
    return conn.execute(
        "SELECT c.*, (SELECT count(*) FROM playground_turns t WHERE t.conversation_id = c.id) AS turns"
        " FROM playground_conversations c ORDER BY c.updated_at DESC LIMIT ?",
        (limit,),
    ).fetchall()


def resolve_flows(conn: sqlite3.Connection, conversation_id: str) -> None:
    """Each turn's flow row, where the proxy's writer has stored it since."""
    pending = conn.execute(
        "SELECT id, flow_id, flows_before FROM playground_turns"
        " WHERE conversation_id = ? AND flow_row_id IS NULL AND flow_id IS NOT NULL",
        (conversation_id,),
    ).fetchall()
    found = []
    for turn in pending:
        row = conn.execute(
            "SELECT id FROM flows WHERE id > ? AND id <= ? AND flow_id = ? LIMIT 1",
            (turn["flows_before"], turn["flows_before"] + FLOW_SEARCH_ROWS, turn["flow_id"]),
        ).fetchone()
        if row is not None:
            found.append((row[0], turn["id"]))
    if found:
        with conn:
            conn.executemany("UPDATE playground_turns SET flow_row_id = ? WHERE id = ?", found)


def turns_with_flows(conn: sqlite3.Connection, conversation_id: str) -> list[dict[str, Any]]:
    """The turns, oldest first, each with its flow's status, tokens, cost and times (None: not stored yet, or
    deleted by retention)."""
    rows = conn.execute(
        f"SELECT t.*, {FLOW_COLUMNS} FROM playground_turns t LEFT JOIN flows f ON f.id = t.flow_row_id"
        " WHERE t.conversation_id = ? ORDER BY t.id LIMIT ?",
        (conversation_id, TURN_LIMIT),
    ).fetchall()
    return [dict(r) for r in rows]


def delete_conversation(conn: sqlite3.Connection, conversation_id: str) -> int:
    """Delete the conversation and its turns (its flows stay, unlinked); the number of turns it had."""
    row = conversation(conn, conversation_id)
    with conn:
        turns = conn.execute("DELETE FROM playground_turns WHERE conversation_id = ?", (conversation_id,)).rowcount
        conn.execute("DELETE FROM playground_conversations WHERE id = ?", (conversation_id,))
        audit.record(conn, "playground.delete", conversation_id, {"turns": turns, "model": row["model"]})
    return turns
