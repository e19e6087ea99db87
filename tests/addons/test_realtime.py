"""The Realtime addon's pieces that need no proxy: the frames it writes and whether a session may go on."""

from __future__ import annotations

import json
import time

import pytest
import wsproto.events
from mitmproxy.test import tflow
from wsproto.connection import Connection, ConnectionType

from addons.realtime import POLICY_VIOLATION, Realtime, Session, close_frame, error_event, frame
from core.errors import OpenAIError
from core.limits import ClientPolicy, Governor
from core.models import Client
from core.state import ProxyState
from storage.counters import MemoryCounters


def as_a_client_reads(data: bytes) -> list[wsproto.events.Event]:
    connection = Connection(ConnectionType.CLIENT)
    connection.receive_data(data)
    return list(connection.events())


@pytest.mark.parametrize("size", [5, 200, 70_000])  # each of the three length encodings
def test_the_error_event_and_close_frame_are_what_a_websocket_client_reads(size):
    event = error_event(OpenAIError(429, "x" * size, "insufficient_quota", "insufficient_quota"))
    text, close = as_a_client_reads(frame(0x1, event) + close_frame(POLICY_VIOLATION, "insufficient_quota"))
    assert isinstance(text, wsproto.events.TextMessage) and text.message_finished
    sent = json.loads(text.data)
    assert sent["type"] == "error" and sent["event_id"].startswith("event_")
    assert sent["error"] == {
        "type": "insufficient_quota",
        "code": "insufficient_quota",
        "message": "x" * size,
        "param": None,
    }
    assert isinstance(close, wsproto.events.CloseConnection)
    assert (close.code, close.reason) == (1008, "insufficient_quota")


def test_a_session_goes_on_while_its_client_and_key_are_enabled_and_within_limits():
    state = ProxyState()
    client = Client(7, "team", ClientPolicy(daily_tokens=100))
    state.clients, state.clients_by_id = {"hash-a": (client, 3), "hash-b": (client, 4)}, {7: client}
    governor = Governor(MemoryCounters())
    addon = Realtime(governor, state)
    assert addon._clients_reloaded in state.client_listeners  # checked whenever clients reload
    session = Session(tflow.twebsocketflow(), 7, 3, "gpt-realtime")
    assert addon._refusal(session) is None
    governor.charge(7, {"total_tokens": 99}, None, time.time())
    assert addon._refusal(session) is None
    governor.charge(7, {"total_tokens": 1}, None, time.time())
    assert addon._refusal(session).code == "insufficient_quota"

    expired = Client(7, "team", ClientPolicy(expires_at=time.time() - 1))
    state.clients, state.clients_by_id = {"hash-a": (expired, 3)}, {7: expired}
    assert addon._refusal(session).code == "key_expired"
    state.clients = {"hash-b": (client, 4)}  # key 3 revoked; the client has another
    state.clients_by_id = {7: client}
    assert addon._refusal(session).code == "invalid_api_key"
    state.clients, state.clients_by_id = {}, {}  # the client disabled
    assert addon._refusal(session).code == "invalid_api_key"
