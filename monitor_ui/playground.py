"""The chat playground (docs/playground.md): a conversation's next turn, sent through the proxy under a client.

The UI is a client of the proxy like any other (monitor_ui/through_proxy.py): the turn is
routed, limited, retried and captured as that client's flow, pinned to a group when the admin
asks. The answer is passed on as it arrives (the proxy's event stream, or its JSON), read on
the way (core/playground.py Answer) and kept as the turn's answer once it has ended; the
proxy names the flow in x-keyrotor-flow, which the turn keeps to link to it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import anyio
import httpx

from core.passes import FLOW_HEADER
from core.playground import Answer, chat_body, error_message, messages_of
from monitor_ui.through_proxy import PLAYGROUND, Target, ensure_builtin_client, open_through_proxy
from storage import client_keys, db, routes
from storage import playground as store

SESSION_HEADER = "x-keyrotor-session"  # the proxy records it with the flow (issue 24): the conversation's id
CONVERSATION_HEADER = "x-keyrotor-conversation"  # on the UI's answer: the conversation the turn belongs to
MAX_PROMPT_CHARS = 200_000
NEW_CLIENT_WAIT_SECONDS = 5.0  # a client made just now: until the proxy has loaded it


class Refused(Exception):
    """Why the turn cannot be sent; `status` is the UI's answer (404, 422, 502)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Ask:
    """What the admin sends: the prompt, the model, and how (all but model and prompt optional)."""

    model: str
    prompt: str
    conversation: str | None = None  # continue this one; None: a new conversation
    group: str | None = None  # UPSTREAM/GROUP or its id: only that group serves the turn
    client: str | None = None  # a client's name or id; None: the built-in "playground" client
    system: str | None = None  # None: the conversation's (a new one: none)
    temperature: float | None = None
    max_tokens: int | None = None
    stream: bool = True


@dataclass(frozen=True)
class Prepared:
    conversation_id: str
    turn_id: int
    client_id: int
    group_id: int | None
    body: bytes
    stream: bool
    new_client: bool


def _client(conn: sqlite3.Connection, value: str | None) -> tuple[int, bool]:
    """(the client's id, whether it was made just now)."""
    value = (value or "").strip()
    if value in ("", PLAYGROUND):
        existed = conn.execute("SELECT 1 FROM clients WHERE name = ?", (PLAYGROUND,)).fetchone() is not None
        return ensure_builtin_client(conn), not existed
    row = client_keys.client_by_id(conn, int(value)) if value.isdecimal() else None
    if row is None:
        row = conn.execute("SELECT * FROM clients WHERE name = ?", (value,)).fetchone()
    if row is None:
        raise Refused(404, f"There is no client {value!r} (a client's name or id).")
    return int(row["id"]), False


def _group(conn: sqlite3.Connection, value: str | None) -> int | None:
    value = (value or "").strip()
    if not value:
        return None
    if value.isdecimal() and conn.execute("SELECT 1 FROM groups WHERE id = ?", (int(value),)).fetchone():
        return int(value)
    try:
        return routes.group_id_of(conn, value)
    except (routes.NotFound, ValueError):
        raise Refused(404, f"There is no upstream group {value!r} (UPSTREAM/GROUP, or its id).") from None


def prepare(conn: sqlite3.Connection, ask: Ask) -> Prepared:
    """The turn, stored and ready to send (a new conversation made for it when none is named)."""
    model, prompt = ask.model.strip(), ask.prompt
    if not model:
        raise Refused(422, "Pick a model.")
    if not prompt.strip():
        raise Refused(422, "The prompt is empty.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise Refused(422, f"The prompt is longer than {MAX_PROMPT_CHARS} characters.")
    client_id, new_client = _client(conn, ask.client)
    group_id = _group(conn, ask.group)
    system = ask.system.strip() if ask.system is not None else None
    if ask.conversation:
        try:
            row = store.conversation(conn, ask.conversation)
        except store.NotFound as e:
            raise Refused(404, str(e)) from None
        conversation_id, turns = row["id"], store.turns_of(conn, row["id"])
        if system is None:
            system = row["system"]
    else:
        conversation_id, turns = store.create_conversation(conn, prompt, client_id, model, group_id, system), []
    body = chat_body(
        model,
        messages_of(system or None, turns, prompt),
        stream=ask.stream,
        temperature=ask.temperature,
        max_tokens=ask.max_tokens,
    )
    turn_id = store.start_turn(
        conn,
        conversation_id,
        prompt,
        client_id=client_id,
        model=model,
        group_id=group_id,
        system=system or None,
        stream=ask.stream,
    )
    return Prepared(conversation_id, turn_id, client_id, group_id, body, ask.stream, new_client)


def prepare_in(db_path, ask: Ask) -> Prepared:
    conn = db.connect(db_path)
    try:
        return prepare(conn, ask)
    finally:
        conn.close()


def finish(db_path, turn_id: int, **outcome) -> None:
    conn = db.connect(db_path)
    try:
        store.finish_turn(conn, turn_id, **outcome)
    finally:
        conn.close()


class Chat:
    """One turn in flight: `open()` sends it and gives the proxy's answer's head; `chunks()` passes its body on
    and, when it ends (or the reader goes away), keeps the outcome as the turn's."""

    def __init__(self, target: Target, prepared: Prepared) -> None:
        self.target = target
        self.prepared = prepared
        self._stack = AsyncExitStack()
        self.response: httpx.Response | None = None

    @property
    def flow_id(self) -> str | None:
        return self.response.headers.get(FLOW_HEADER) if self.response is not None else None

    async def _send(self) -> httpx.Response:
        p = self.prepared
        opened = open_through_proxy(
            self.target,
            p.client_id,
            "POST",
            "/v1/chat/completions",
            p.body,
            group_id=p.group_id,
            extra_headers={SESSION_HEADER: p.conversation_id},
        )
        return await self._stack.enter_async_context(opened)

    async def open(self) -> httpx.Response:
        deadline = time.monotonic() + (NEW_CLIENT_WAIT_SECONDS if self.prepared.new_client else 0)
        try:
            response = await self._send()
            while response.status_code == 401 and time.monotonic() < deadline:
                await self._stack.aclose()  # the proxy has not loaded the client made just now: a new pass
                await asyncio.sleep(0.25)
                response = await self._send()
        except (httpx.HTTPError, OSError) as e:
            await self._stack.aclose()
            message = f"The proxy did not answer ({type(e).__name__}): is it running?"
            await asyncio.to_thread(
                finish,
                self.target.db_path,
                self.prepared.turn_id,
                status=None,
                flow_id=None,
                answer=None,
                error=message,
            )
            raise Refused(502, message) from None
        self.response = response
        return response

    @property
    def is_stream(self) -> bool:
        response = self.response
        return response is not None and response.headers.get("content-type", "").startswith("text/event-stream")

    async def chunks(self) -> AsyncIterator[bytes]:
        response = self.response
        assert response is not None, "open() first"
        answer = Answer(stream=self.is_stream)
        ended = False
        try:
            async for chunk in response.aiter_bytes():
                answer.feed(chunk)
                yield chunk
            ended = True
        finally:
            # Shielded: when the reader went away this generator is being cancelled, and the turn
            # must still be kept, with what arrived.
            with anyio.CancelScope(shield=True):
                await self._stack.aclose()
                await asyncio.to_thread(self._keep, answer, ended)

    def _keep(self, answer: Answer, ended: bool) -> None:
        response = self.response
        assert response is not None
        status, text, error = response.status_code, answer.finish(), None
        if status >= 400:
            error = error_message(answer.body()) or f"HTTP {status}"
            text = None
        elif not ended:
            error = f"the answer was cut short after {len(text)} characters (the reader went away)"
            text = None
        finish(
            self.target.db_path, self.prepared.turn_id, status=status, flow_id=self.flow_id, answer=text, error=error
        )


async def ask_through_proxy(target: Target, ask: Ask) -> AsyncIterator[tuple[Chat, bytes]]:
    """The turn `ask`, sent: (the chat, each piece of its answer as it arrives); for run.py."""
    prepared = await asyncio.to_thread(prepare_in, target.db_path, ask)
    chat = Chat(target, prepared)
    await chat.open()
    async for chunk in chat.chunks():
        yield chat, chunk
