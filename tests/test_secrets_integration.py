"""Secrets stay secret: no key value in mitmweb, in captures or in logs, through a real mitmproxy."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from websockets.sync.client import connect

from storage import db, flows
from storage.flows import FlowFilter
from tests.conftest import ADMIN_KEY, Keyrotor, stored_flows, wait_for
from tests.fake_upstream import FakeUpstream

GOOD = ["sk-good-secret-aaaaaaaaaaaaaaaaaaaaaa-0001", "sk-good-secret-bbbbbbbbbbbbbbbbbbbbbb-0002"]
UNKNOWN = "kr-never-issued-cccccccccccccccccccc-0003"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def client_for(kr: Keyrotor, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=20)


def stored_bytes(kr: Keyrotor) -> bytes:
    """Everything the database holds, full-text index and write-ahead log included."""
    return b"".join(p.read_bytes() for p in kr.tmp.glob("keyrotor.db*") if p.is_file())


def flow_rows(kr: Keyrotor) -> list[dict]:
    """Flows with their headers and bodies unpacked: what a compressed file would not show in stored_bytes."""
    return stored_flows(kr.db_path)


class Updates:
    """Every message mitmweb's /updates websocket sends, collected in the background."""

    def __init__(self, web_port: int) -> None:
        self.messages: list[str] = []
        self._url = f"ws://127.0.0.1:{web_port}/updates?token={ADMIN_KEY}"
        self._open = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self._open.wait(20), "could not connect to mitmweb's /updates"

    def _read(self) -> None:
        with connect(self._url, open_timeout=20) as socket:
            self._open.set()
            while not self._stop.is_set():
                try:
                    message = socket.recv(timeout=0.1)
                except TimeoutError:
                    continue
                self.messages.append(message if isinstance(message, str) else message.decode("utf-8", "replace"))

    def flows_finished(self) -> set[str]:
        done = set()
        for message in list(self.messages):
            data = json.loads(message)
            if data.get("type") == "flows/update" and data["payload"]["flow"].get("response"):
                done.add(data["payload"]["flow"]["id"])
        return done

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def web(keyrotor: Keyrotor) -> Iterator[tuple[Keyrotor, str, int, Updates]]:
    client_key, web_port = keyrotor.start_with_mitmweb(*GOOD)
    updates = Updates(web_port)
    yield keyrotor, client_key, web_port, updates
    updates.close()


def test_mitmweb_never_receives_a_credential(web, upstream: FakeUpstream):
    kr, client_key, web_port, updates = web
    mitmweb = f"http://127.0.0.1:{web_port}"
    client = client_for(kr, client_key)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    requests = 2
    for headers, params in [
        ({"api-key": client_key}, {}),  # Azure's form
        ({}, {"api-key": client_key}),  # in the query string
        ({"authorization": f"Bearer {client_key}", "x-api-key": client_key, "cookie": f"k={client_key}"}, {}),
        ({"authorization": f"Bearer {GOOD[0]}"}, {}),  # a pool key pasted by mistake: refused
        ({"api-key": UNKNOWN}, {"key": UNKNOWN}),
        ({"authorization": f"Basic {UNKNOWN}"}, {}),
    ]:
        httpx.get(f"{kr.base_url}/models", headers=headers, params=params, timeout=20)
        requests += 1

    # While a request waits for upstream, the live flow mitmweb serves holds no key either.
    upstream.answer_delay = 1.5
    arrived = len(upstream.received)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.models.list)
        wait_for(lambda: len(upstream.received) > arrived, what="the slow request upstream")
        in_flight = httpx.get(f"{mitmweb}/flows", params={"token": ADMIN_KEY}).text
        waiting.result()
    requests += 1

    wait_for(lambda: len(updates.flows_finished()) == requests, what=f"{requests} finished flows on /updates")
    flows = httpx.get(f"{mitmweb}/flows", params={"token": ADMIN_KEY}).json()
    seen = ["\n".join(updates.messages), in_flight, json.dumps(flows)]
    seen.append(httpx.get(f"{mitmweb}/flows/dump", params={"token": ADMIN_KEY}).content.decode("latin-1"))
    for flow in flows:
        for part in ("request", "response"):
            url = f"{mitmweb}/flows/{flow['id']}/{part}/content.data"
            seen.append(httpx.get(url, params={"token": ADMIN_KEY}).content.decode("latin-1"))
    everything = "\n".join(seen)
    assert "[upstream key #1 ...0001]" in everything and "[client key #1]" in everything  # placeholders, shown
    for secret in (*GOOD, client_key, UNKNOWN, UNKNOWN[-20:]):
        assert secret not in everything
    assert sorted(set(upstream.keys_seen())) == GOOD
    assert len(upstream.keys_seen()) == requests - 3  # the last three headers above are refused


def test_a_client_key_in_the_query_string_works_and_is_never_stored(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = keyrotor.start_serving(GOOD[0])
    for name in ("api-key", "key"):
        response = httpx.get(f"{keyrotor.base_url}/models", params={name: client_key, "limit": "2"})
        assert response.status_code == 200
    refused = httpx.get(f"{keyrotor.base_url}/models", params={"key": UNKNOWN})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert [r.key for r in upstream.received] == [GOOD[0], GOOD[0]]
    assert [r.query for r in upstream.received] == ["limit=2", "limit=2"]  # the key did not travel on

    rows = wait_for(lambda: len(r := flow_rows(keyrotor)) == 3 and r, what="3 captured rows")
    assert [row["path"] for row in rows] == ["/v1/models?limit=2", "/v1/models?limit=2", "/v1/models"]
    conn = db.connect(keyrotor.db_path, readonly=True)
    assert flows.search_flows(conn, FlowFilter(q=client_key)) == []  # not in the full-text index either
    conn.close()
    for secret in (client_key, UNKNOWN):
        assert secret.encode() not in stored_bytes(keyrotor)
        assert secret not in repr(rows)  # nor in the headers and bodies, uncompressed
        assert secret not in keyrotor.logs()


def test_a_pool_key_upstream_echoes_is_stored_as_its_placeholder(keyrotor: Keyrotor, upstream: FakeUpstream):
    client_key = keyrotor.start_serving(GOOD[0])
    client = client_for(keyrotor, client_key)
    upstream.set_key(GOOD[0], "echo")
    raw = client.models.with_raw_response.list()
    assert json.loads(raw.text)["received_key"] == "[upstream key #1 ...0001]"  # what the client gets too
    assert raw.headers["x-received-key"] == "[upstream key #1 ...0001]"
    upstream.set_key(GOOD[0], "echo_gzip")
    with pytest.raises(openai.BadRequestError) as raised:
        client.models.list()
    assert "[upstream key #1 ...0001]" in raised.value.message
    assert upstream.keys_seen() == [GOOD[0], GOOD[0]]

    rows = wait_for(lambda: len(r := flow_rows(keyrotor)) == 2 and r, what="2 captured rows")
    assert "[upstream key #1 ...0001]" in rows[0]["response_body"]
    assert ["x-received-key", "[upstream key #1 ...0001]"] in json.loads(rows[0]["response_headers"])
    assert "[upstream key #1 ...0001]" in rows[1]["response_body"]
    assert GOOD[0].encode() not in stored_bytes(keyrotor)
    assert GOOD[0] not in repr(rows)


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_a_pool_key_echoed_in_a_compressed_answer_or_stream_is_replaced(
    keyrotor: Keyrotor, upstream: FakeUpstream, encoding: str
):
    client_key = keyrotor.start_serving(GOOD[0])
    client = client_for(keyrotor, client_key)
    placeholder_text = "[upstream key #1 ...0001]"
    upstream.set_key(GOOD[0], f"echo_{encoding}_ok")
    raw = client.models.with_raw_response.list()
    assert raw.status_code == 200
    assert json.loads(raw.text)["received_key"] == placeholder_text  # handed on decoded, the key replaced

    upstream.set_key(GOOD[0], f"echo_stream_{encoding}")
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    reply = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert reply == f"You sent {placeholder_text}, yes {placeholder_text}."

    rows = wait_for(lambda: len(r := flow_rows(keyrotor)) == 2 and r, what="2 captured rows")
    assert all(placeholder_text in row["response_body"] for row in rows)
    assert GOOD[0].encode() not in stored_bytes(keyrotor)
    assert GOOD[0] not in repr(rows)
    assert GOOD[0] not in keyrotor.logs()
