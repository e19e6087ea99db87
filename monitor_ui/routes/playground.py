"""The chat playground (docs/playground.md): try a model through the proxy, under a client; the page, its
JSON twins, and the conversations kept."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from core.passes import FLOW_HEADER
from monitor_ui import views
from monitor_ui.deps import AdminApi, AdminApiChange, AdminForm, AdminPage, PageOf, Settings, WriteConn
from monitor_ui.pages import see_other
from monitor_ui.playground import CONVERSATION_HEADER, MAX_PROMPT_CHARS, Ask, Chat, Refused, prepare_in
from monitor_ui.routes.models import models_overview
from monitor_ui.through_proxy import PLAYGROUND, ensure_builtin_client
from storage import client_keys, routes
from storage import playground as store

router = APIRouter(prefix="/playground", tags=["playground"])
api = APIRouter(prefix="/api/playground", tags=["playground"])

ConversationId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^pg-[0-9a-f]{1,60}$")]


class ChatAsk(BaseModel):
    """One prompt of a conversation: a new conversation unless `conversation` names one to continue."""

    model: str = Field(min_length=1, max_length=200, description="a model the groups serve")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="the user's next message")
    conversation: str | None = Field(None, max_length=64, description="continue this conversation (its id)")
    group: str | int | None = Field(None, description="UPSTREAM/GROUP label or id: only that group serves it")
    client: str | int | None = Field(None, description="run as this client (name or id); default: playground")
    system: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="system prompt; left out: the conversation's"
    )
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    stream: bool = True


class Option(BaseModel):
    id: int
    label: str


class PlaygroundOptions(BaseModel):
    models: list[str] = Field(description="every model a group lists (a catch-all group serves others too)")
    groups: list[Option]
    clients: list[Option]
    default_client: str


class ConversationSummary(BaseModel):
    id: str
    title: str | None
    model: str | None
    client_id: int | None
    group_id: int | None
    turns: int
    created_at: float
    updated_at: float


class PlaygroundConversations(BaseModel):
    conversations: list[ConversationSummary]


class TurnOut(BaseModel):
    id: int
    prompt: str
    answer: str | None
    error: str | None
    status: int | None
    model: str | None
    stream: bool
    flow_id: str | None = Field(description="mitmproxy's id of the flow that carried the turn")
    flow_row_id: int | None = Field(description="the flow's id in keyrotor (/flows/{id}); None: not stored yet")
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cost: float | None
    first_byte_ms: float | None
    duration_ms: float | None
    created_at: float


class PlaygroundConversation(BaseModel):
    id: str
    title: str | None
    model: str | None
    client: str | None
    group: str | None
    system: str | None
    created_at: float
    updated_at: float
    turns: list[TurnOut]


class ChatCompletion(BaseModel):
    """With `stream` off: the chat completion the proxy answered (OpenAI's shape); with it on, its event stream."""

    id: str | None = None
    object: str | None = None
    model: str | None = None
    choices: list[dict[str, Any]] = []
    usage: dict[str, Any] | None = None


class PlaygroundDeleted(BaseModel):
    deleted: str
    turns: int


def _options(conn: sqlite3.Connection) -> dict[str, Any]:
    ensure_builtin_client(conn)  # listed, and known to the proxy by the time a prompt is sent
    overview = models_overview(conn)
    groups = [views.group_summary(r) for r in routes.list_groups(conn)]
    clients = client_keys.list_clients(conn)
    return {
        "models": [m["model"] for m in overview["models"] if m["groups"]],
        "groups": [{"id": g["id"], "label": g["label"]} for g in groups if g["serving"]],
        "clients": [{"id": c["id"], "label": c["name"]} for c in clients if c["enabled"]],
        "default_client": PLAYGROUND,
    }


def _summaries(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [
        {k: r[k] for k in ("id", "title", "model", "client_id", "group_id", "turns", "created_at", "updated_at")}
        for r in store.list_conversations(conn)
    ]


def _conversation(conn: sqlite3.Connection, conversation_id: str) -> dict[str, Any]:
    try:
        row = store.conversation(conn, conversation_id)
    except store.NotFound as e:
        raise HTTPException(404, str(e)) from None
    store.resolve_flows(conn, conversation_id)
    client = client_keys.client_by_id(conn, row["client_id"]) if row["client_id"] is not None else None
    group = routes.group_labels(conn).get(row["group_id"]) if row["group_id"] is not None else None
    turns = [{**t, "stream": bool(t["stream"])} for t in store.turns_with_flows(conn, conversation_id)]
    return {
        "id": row["id"],
        "title": row["title"],
        "model": row["model"],
        "client": client["name"] if client is not None else None,
        "group": group,
        "system": row["system"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "turns": turns,
    }


@router.get("", response_class=HTMLResponse, dependencies=[AdminPage])
def show_playground(
    page: PageOf, conn: WriteConn, conversation: Annotated[str | None, Query(max_length=64)] = None
) -> HTMLResponse:
    """The playground: a conversation (a new one, or `conversation` reopened), the history beside it."""
    opened = _conversation(conn, conversation) if conversation else None
    context = {
        "section": "playground",
        "options": _options(conn),
        "history": _summaries(conn),
        "conversation": opened,
    }
    return page.render("playground.html", context)


@router.post("/{conversation_id}/delete", dependencies=[AdminForm])
def delete_conversation(conversation_id: ConversationId, conn: WriteConn) -> Response:
    """Delete a conversation from the page's history (its flows stay)."""
    try:
        store.delete_conversation(conn, conversation_id)
    except store.NotFound as e:
        raise HTTPException(404, str(e)) from None
    return see_other("/playground")


@api.get("", dependencies=[AdminApi], response_model=PlaygroundOptions)
def read_options_json(conn: WriteConn) -> dict[str, Any]:
    """What the playground offers: the models the groups serve, the groups to pin, the clients to run as."""
    return _options(conn)


@api.get("/conversations", dependencies=[AdminApi], response_model=PlaygroundConversations)
def list_conversations_json(conn: WriteConn) -> dict[str, Any]:
    """The conversations kept, newest first, each with its title (the first words of its first prompt)."""
    return {"conversations": _summaries(conn)}


@api.get("/conversations/{conversation_id}", dependencies=[AdminApi], response_model=PlaygroundConversation)
def read_conversation_json(conversation_id: ConversationId, conn: WriteConn) -> dict[str, Any]:
    """A conversation's turns, each with its flow: id, status, tokens, cost, first-byte and total time."""
    return _conversation(conn, conversation_id)


@api.delete("/conversations/{conversation_id}", dependencies=[AdminApiChange], response_model=PlaygroundDeleted)
def delete_conversation_json(conversation_id: ConversationId, conn: WriteConn) -> dict[str, Any]:
    """Delete a conversation and its turns; its flows stay, like every captured flow (no longer linked)."""
    try:
        return {"deleted": conversation_id, "turns": store.delete_conversation(conn, conversation_id)}
    except store.NotFound as e:
        raise HTTPException(404, str(e)) from None


STREAMED = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


@api.post("/chat", dependencies=[AdminApiChange], response_model=ChatCompletion, responses=STREAMED)
async def send_chat(ask: ChatAsk, settings: Settings) -> Response:
    """Send the next prompt through the proxy; the proxy's answer is passed on as it arrives (an event
    stream, or JSON; an error with its status), with the turn's flow in x-keyrotor-flow and its
    conversation in x-keyrotor-conversation."""
    asked = Ask(
        model=ask.model,
        prompt=ask.prompt,
        conversation=ask.conversation,
        group=str(ask.group) if ask.group not in (None, "") else None,
        client=str(ask.client) if ask.client not in (None, "") else None,
        system=ask.system,
        temperature=ask.temperature,
        max_tokens=ask.max_tokens,
        stream=ask.stream,
    )
    try:
        prepared = await asyncio.to_thread(prepare_in, settings.db_path, asked)
        chat = Chat(settings, prepared)
        response = await chat.open()
    except Refused as e:
        raise HTTPException(e.status, e.message) from None
    headers = {CONVERSATION_HEADER: prepared.conversation_id, "cache-control": "no-store"}
    if chat.flow_id:
        headers[FLOW_HEADER] = chat.flow_id
    media_type = response.headers.get("content-type", "application/json")
    return StreamingResponse(chat.chunks(), status_code=response.status_code, media_type=media_type, headers=headers)
