"""Realtime sessions (WebSocket) are charged as they go and end when their client may no longer use them.

A session's responses each end with a `response.done` event carrying that response's usage:
it is charged to the client's budgets then (priced as the capture prices it), not once the
session closes. The session is closed, with an OpenAI-shaped `error` event first, when its
client is over budget (checked at each `response.done`), expires (a timer at its expiry),
or is disabled or has the session's key revoked (checked whenever the state snapshot reloads
clients). The upstream side closes with it, so nothing more is generated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from core.bodies import event_usage, json_object
from core.errors import OpenAIError
from core.limits import Governor, Refusal, refused
from core.metadata import AccessVerdict, RequestedModel
from core.metering import usage_of
from core.routing import query_model
from core.state import ProxyState

requests_log = logging.getLogger("keyrotor.requests")  # one request's line: the console shows it with --verbose

POLICY_VIOLATION = 1008  # the WebSocket close code for "the session may not go on"


@dataclass
class Session:
    flow: http.HTTPFlow
    client_id: int
    key_id: int | None
    model: str | None
    expiry: asyncio.TimerHandle | None = None
    closing: bool = False
    charged: list[float] = field(default_factory=list)  # tokens of each response.done, for the log


def error_event(error: OpenAIError) -> bytes:
    """Realtime's own error event: {"type": "error", "error": {...}}."""
    return json.dumps(
        {
            "type": "error",
            "event_id": "event_" + os.urandom(8).hex(),
            "error": {"type": error.type, "code": error.code, "message": error.message, "param": None},
        }
    ).encode()


def frame(opcode: int, payload: bytes) -> bytes:
    """One whole, unmasked, uncompressed WebSocket frame from the server (RFC 6455 section 5.2)."""
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, size])
    elif size < 1 << 16:
        head = bytes([0x80 | opcode, 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + size.to_bytes(8, "big")
    return head + payload


def close_frame(code: int, reason: str) -> bytes:
    return frame(0x8, code.to_bytes(2, "big") + reason.encode()[:120])


class Realtime:
    def __init__(self, governor: Governor, state: ProxyState) -> None:
        self.governor = governor
        self.state = state
        self.sessions: dict[str, Session] = {}  # by flow.id
        state.client_listeners.append(self._clients_reloaded)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        verdict = AccessVerdict.of(flow.metadata)
        if verdict is None or verdict.client_id is None:
            return
        # Priced by the model Access checked (core/request_model.py), so the allowlist and the charge agree.
        named = RequestedModel.of(flow.metadata)
        model = named.model if named is not None else query_model(flow.request.path)
        session = Session(flow, verdict.client_id, verdict.key_id, model)
        self.sessions[flow.id] = session
        self._arm(session)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        session = self.sessions.get(flow.id)
        if session is None or flow.websocket is None:
            return
        message = flow.websocket.messages[-1]
        if message.from_client or not message.is_text or b'"response.done"' not in message.content:
            return
        event = json_object(message.content)
        if not event or event.get("type") != "response.done":
            return
        client = self.state.clients_by_id.get(session.client_id)
        if client is not None:  # every client's spend is counted, limited or not
            self._charge(session, event)
        self._check(session, message)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        session = self.sessions.pop(flow.id, None)
        if session is not None and session.expiry is not None:
            session.expiry.cancel()

    def done(self) -> None:
        for session in self.sessions.values():
            if session.expiry is not None:
                session.expiry.cancel()
        self.sessions.clear()

    def _charge(self, session: Session, event: dict[str, Any]) -> None:
        usage = event_usage(event)
        if usage is None:
            return
        cost = self.governor.prices.cost_of(session.model, usage_of(usage))
        self.governor.charge(session.client_id, usage, cost, time.time())

    def _arm(self, session: Session) -> None:
        """A timer for the client's expiry, replacing the one set before (expiry may have changed)."""
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        client = self.state.clients_by_id.get(session.client_id)
        expires_at = client.policy.expires_at if client is not None else None
        if expires_at is not None:
            delay = max(0.0, expires_at - time.time())
            session.expiry = asyncio.get_running_loop().call_later(delay, self._check, session)

    def _clients_reloaded(self) -> None:
        for session in list(self.sessions.values()):
            if not self._check(session):
                self._arm(session)

    def _check(self, session: Session, passing: WebSocketMessage | None = None) -> bool:
        """Close the session when its client may no longer use it; whether it is closing.

        `passing`: the message whose hook this is (a response.done), sent before the error event.
        """
        if session.closing:
            return True
        refusal = self._refusal(session)
        if refusal is None:
            return False
        session.closing = True
        verdict = AccessVerdict.of(session.flow.metadata)
        if verdict is not None:  # the row's refusal and error say why the session ended
            verdict.rejected, verdict.reason = refusal.code, refusal.reason
        # Not from within a hook of this flow: its connection handler is busy with that event.
        # Not from within a hook of this flow: its connection handler is busy with that event, and
        # would send the message in passing only after this hook (so it is sent here, in order).
        last = b""
        if passing is not None:
            passing.drop()
            last = frame(0x1 if passing.is_text else 0x2, passing.content)
        asyncio.get_running_loop().call_soon(self._close, session, refusal, last)
        return True

    def _refusal(self, session: Session) -> Refusal | None:
        client = self.state.clients_by_id.get(session.client_id)
        keys = self.state.clients.values()
        if client is None or (session.key_id is not None and not any(k == session.key_id for _, k in keys)):
            # What a request with the key would now be answered: 401 invalid_api_key (addons/access.py).
            return refused(
                401,
                "invalid_api_key",
                f"This session's client key (#{session.key_id}) is no longer accepted: it was revoked or its client"
                " disabled. The session is closed.",
                "invalid_request_error",
            )
        now = time.time()
        return Governor.check_key(client.policy, (), None, now) or self.governor.over_budget(
            client.id, client.policy, now
        )

    def _close(self, session: Session, refusal: Refusal, last: bytes = b"") -> None:
        """The error event to the client, then a close frame, then the connections closed."""
        flow = session.flow
        # mitmproxy has no command that closes a WebSocket, and a message it is asked to inject is
        # sent only after that message's hooks: both frames are written here, then the client's
        # connection closed, on which mitmproxy closes upstream's side (checked on mitmproxy 12.3.1).
        # Uncompressed frames are valid under permessage-deflate (RFC 7692: RSV1 unset).
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(flow.client_conn.id) if proxyserver is not None else None
        client_io = handler.transports.get(flow.client_conn) if handler is not None else None
        if client_io is None or client_io.writer is None or flow.websocket is None:
            return  # the session already ended
        requests_log.info("closing a Realtime session of client #%d: %s", session.client_id, refusal.reason)
        event = error_event(refusal.error)
        flow.websocket.messages.append(WebSocketMessage(Opcode.TEXT, False, event, injected=True))  # for the row
        client_io.writer.write(last + frame(0x1, event) + close_frame(POLICY_VIOLATION, refusal.code))
        client_io.writer.close()
