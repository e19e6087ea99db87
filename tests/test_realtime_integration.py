"""Realtime end to end: a WebSocket client (`websockets`) → a real mitmproxy running keyrotor → a fake
Realtime endpoint that accepts only pooled keys. The session is authenticated, routed and recorded."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator

import httpx
import pytest
import websockets

from core.prices import load_prices
from tests.conftest import ADMIN_KEY, ROOT, Keyrotor, stored_flows, wait_for
from tests.fake_upstream import INSECURE_KEY_PROTOCOL, FakeUpstream
from tests.test_secrets_integration import Updates

GOOD = ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-bbbbbbbbbbbbbbbbbbbbbbbbbbbb0002"]
REALTIME_KEY = "sk-good-realtime-dddddddddddddddddddd04"
PRICES = load_prices(ROOT / "prices.toml")
HELLO = {
    "type": "conversation.item.create",
    "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello over a socket"}]},
}
AUDIO = {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(5000)).decode()}


def rows(kr: Keyrotor) -> list[dict]:
    """Every flow as storage's readers get it (headers and bodies unpacked), oldest first."""
    return stored_flows(kr.db_path)


async def converse(url: str, **connect) -> tuple[str | None, list[dict]]:
    """One session: an item, some audio, a binary frame, a response; what the server said, in order."""
    heard = []
    async with websockets.connect(url, **connect) as ws:
        heard.append(json.loads(await ws.recv()))  # session.created
        await ws.send(json.dumps(HELLO))
        heard.append(json.loads(await ws.recv()))  # conversation.item.created
        await ws.send(json.dumps(AUDIO))
        await ws.send(b"\x00\x01 a binary frame")
        await ws.send(json.dumps({"type": "response.create"}))
        while heard[-1]["type"] != "response.done":
            heard.append(json.loads(await ws.recv()))
        return ws.subprotocol, heard


@pytest.fixture
def running(keyrotor: Keyrotor) -> Iterator[tuple[Keyrotor, str]]:
    client_key = keyrotor.start_serving(*GOOD, proxy_args=("--set", "proxy.header_timeout_seconds=1"))
    yield keyrotor, client_key


def ws_url(kr: Keyrotor, model: str = "gpt-realtime") -> str:
    return f"ws://127.0.0.1:{kr.proxy_port}/v1/realtime?model={model}"


def test_a_session_with_the_client_key_as_authorization_is_swapped_and_recorded(running, upstream: FakeUpstream):
    kr, client_key = running
    kr.start_ui()
    upstream.stream_chunks = 3
    protocol, heard = asyncio.run(converse(ws_url(kr), additional_headers={"Authorization": f"Bearer {client_key}"}))
    assert protocol is None
    kinds = [e["type"] for e in heard]
    assert kinds[:3] == ["session.created", "conversation.item.created", "response.created"]
    assert kinds.count("response.output_text.delta") == 3 and kinds[-1] == "response.done"
    (upgrade,) = upstream.received
    assert upgrade.key in GOOD and client_key not in json.dumps(upgrade.headers)

    row = wait_for(lambda: (r := rows(kr)) and r[0], what="the session's row")
    assert (row["method"], row["path"], row["status"], row["model"]) == (
        "GET",
        "/v1/realtime?model=gpt-realtime",
        101,
        "gpt-realtime",
    )
    assert row["upstream_key_id"] is not None and row["error"] is None
    usage = heard[-1]["response"]["usage"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        usage["input_tokens"],
        usage["output_tokens"],
        usage["total_tokens"],
    )
    audio_tokens = usage["input_token_details"]["audio_tokens"]
    assert audio_tokens > 0
    price = PRICES.price_of("gpt-realtime")
    text_in = usage["input_tokens"] - audio_tokens
    cost = (text_in * price.input + audio_tokens * price.audio_input + usage["output_tokens"] * price.output) / 1e6
    assert row["cost"] == pytest.approx(cost)

    messages = json.loads(row["websocket_messages"])
    sent = [(m[1], m[2]) for m in messages]
    # Every message, both ways, in order: the client's four and the server's each.
    assert sent[:2] == [("server", "text"), ("client", "text")]
    assert sent.count(("client", "binary")) == 1 and sent.count(("client", "text")) == 3
    assert sent.count(("server", "text")) == len(heard)
    offsets = [m[0] for m in messages]
    assert offsets == sorted(offsets) and offsets[0] >= 0
    assert json.loads(messages[1][4]) == HELLO
    binary = next(m for m in messages if m[2] == "binary")
    assert binary[3] == len(b"\x00\x01 a binary frame") and binary[4] is None

    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    detail = httpx.get(f"{kr.ui_url}/api/flows/{row['id']}", headers=admin).json()
    assert detail["streamed_text"] == "".join(e["delta"] for e in heard if e["type"] == "response.output_text.delta")
    assert [m["type"] for m in detail["websocket_messages"]][:2] == ["session.created", "conversation.item.create"]
    page = httpx.get(f"{kr.ui_url}/flows/{row['id']}", headers=admin).text
    assert "WebSocket messages (" in page and "<td>response.done</td>" in page


def test_a_browser_session_with_the_key_as_subprotocol_never_shows_it(running, upstream: FakeUpstream):
    kr, client_key = running
    protocols = ["realtime", INSECURE_KEY_PROTOCOL + client_key]
    protocol, heard = asyncio.run(converse(ws_url(kr), subprotocols=protocols))
    assert protocol == "realtime" and heard[-1]["type"] == "response.done"
    (upgrade,) = upstream.received
    offered = [p.strip() for p in upgrade.headers["sec-websocket-protocol"].split(",")]
    pooled = upgrade.key
    assert pooled in GOOD and offered == ["realtime", INSECURE_KEY_PROTOCOL + pooled]  # the pooled key went up
    row = wait_for(lambda: (r := rows(kr)) and r[0], what="the session's row")
    assert row["status"] == 101 and row["client_key_id"] is not None
    stored = json.dumps(dict(row), default=str)
    for secret in (client_key, *GOOD):
        assert secret not in stored, "a key reached the row"
        assert secret not in kr.logs(), "a key reached the proxy's log"
    shown = dict(json.loads(row["request_headers"]))
    assert shown["Sec-WebSocket-Protocol"].startswith("realtime, openai-insecure-api-key.[upstream key #")


def test_a_session_is_routed_by_its_urls_model(keyrotor: Keyrotor, upstream: FakeUpstream):
    with FakeUpstream().start() as realtime:
        kr = keyrotor
        kr.add_keys(*GOOD)
        kr.add_upstream_serving("voice/realtime", realtime.url + "/v1", "gpt-realtime", REALTIME_KEY)
        client_key = kr.add_client("alice")
        kr.start_proxy()
        headers = {"Authorization": f"Bearer {client_key}"}
        asyncio.run(converse(ws_url(kr, "gpt-realtime"), additional_headers=headers))
        asyncio.run(converse(ws_url(kr, "gpt-4o-mini-realtime-preview"), additional_headers=headers))
        assert [r.key for r in realtime.received] == [REALTIME_KEY]  # its model: the group that lists it
        assert [r.key in GOOD for r in upstream.received] == [True]  # another: the group for every model
        first, second = wait_for(lambda: len(r := rows(kr)) == 2 and r, what="two sessions")
        assert (first["model"], second["model"]) == ("gpt-realtime", "gpt-4o-mini-realtime-preview")
        assert first["group_id"] != second["group_id"]


def test_an_unknown_client_key_gets_401_and_upstream_nothing(running, upstream: FakeUpstream):
    kr, _ = running
    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(converse(ws_url(kr), subprotocols=["realtime", INSECURE_KEY_PROTOCOL + "kr-not-a-key-we-issued"]))
    assert refused.value.response.status_code == 401
    assert upstream.received == []
    row = wait_for(lambda: (r := rows(kr)) and r[0], what="the refusal's row")
    assert row["status"] == 401 and "kr-not-a-key-we-issued" not in json.dumps(dict(row), default=str)


def test_a_session_outlives_the_header_deadline(running, upstream: FakeUpstream):
    # proxy.header_timeout_seconds=1 closes idle HTTP connections; an open session is not one.
    kr, client_key = running

    async def long_session() -> str:
        async with websockets.connect(ws_url(kr), additional_headers={"Authorization": f"Bearer {client_key}"}) as ws:
            await ws.recv()
            await asyncio.sleep(2.5)  # the behaviour under test is time passing, not a synchronisation
            await ws.send(json.dumps({"type": "response.create"}))
            while (event := json.loads(await ws.recv()))["type"] != "response.done":
                pass
            return event["type"]

    assert asyncio.run(long_session()) == "response.done"


def test_mitmweb_never_shows_the_subprotocol_key(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key, web_port = keyrotor.start_with_mitmweb(*GOOD)
    updates = Updates(web_port)
    try:
        protocols = ["realtime", INSECURE_KEY_PROTOCOL + client_key]
        _, heard = asyncio.run(converse(ws_url(keyrotor), subprotocols=protocols))
        assert heard[-1]["type"] == "response.done" and upstream.received[0].key in GOOD
        wait_for(lambda: rows(keyrotor), what="the session's row")  # ended, so mitmweb has it whole
        mitmweb = f"http://127.0.0.1:{web_port}"
        flows = httpx.get(f"{mitmweb}/flows", params={"token": ADMIN_KEY}).json()
        dump = httpx.get(f"{mitmweb}/flows/dump", params={"token": ADMIN_KEY}).content.decode("latin-1")
        everything = "\n".join([*updates.messages, json.dumps(flows), dump])
        assert "openai-insecure-api-key.[upstream key #" in everything  # the placeholder, shown
        for secret in (client_key, *GOOD):
            assert secret not in everything
    finally:
        updates.close()


def test_a_pooled_key_refused_at_the_upgrade_is_learned_and_the_next_session_uses_another(
    keyrotor: Keyrotor, upstream: FakeUpstream
):
    revoked = "sk-revoked-cccccccccccccccccccccccc0003"
    client_key = keyrotor.start_serving(revoked, GOOD[0])
    headers = {"Authorization": f"Bearer {client_key}"}
    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(converse(ws_url(keyrotor), additional_headers=headers))
    # Not a confusing 404 from a retry that cannot speak WebSocket: keyrotor's 503, saying when to connect again.
    answer = refused.value.response
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert json.loads(answer.body)["error"]["code"] == "no_upstream_key_available"
    _, heard = asyncio.run(converse(ws_url(keyrotor), additional_headers=headers))
    assert heard[-1]["type"] == "response.done"
    assert [r.key for r in upstream.received] == [revoked, GOOD[0]]
    listing = wait_for(lambda: "invalid" in (out := keyrotor.cli("keys", "list").stdout) and out)
    assert "403" in listing
