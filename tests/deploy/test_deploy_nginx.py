"""deploy/nginx.conf in a real nginx, in front of two real keyrotor nodes (one database here), driven by the
official openai client, as compose.yaml wires them (tests/deploy/conftest.py).

What a client of the deployment notices: answers through nginx; a stream arrives chunk by chunk,
its first chunk before upstream has sent its last; requests spread over both nodes; a node stopped,
the other serves every request; Realtime upgrades pass; the client's own address is what keyrotor
checks and records, whatever it writes into X-Forwarded-For; nginx's own refusals are OpenAI-shaped.
"""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, wait_for
from tests.deploy.conftest import Cluster
from tests.fake_upstream import FakeUpstream
from tests.test_realtime_integration import converse

pytestmark = pytest.mark.deploy

MESSAGES = [{"role": "user", "content": "Hello through nginx"}]


def openai_client(cluster: Cluster, key: str | None = None, source: str = "127.0.0.1") -> openai.OpenAI:
    """The official client against nginx, its connections from `source` (a loopback address), no retries."""
    http_client = httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30)
    return openai.OpenAI(
        base_url=cluster.nginx.base_url, api_key=key or cluster.client_key, max_retries=0, http_client=http_client
    )


def chat(cluster: Cluster, key: str | None = None, source: str = "127.0.0.1", **extra) -> str:
    completion = openai_client(cluster, key, source).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, **extra
    )
    return completion.choices[0].message.content or ""


def rows(cluster: Cluster, count: int) -> list:
    return wait_for(
        lambda: len(r := cluster.keyrotor.query("SELECT * FROM flows ORDER BY id")) >= count and r,
        what=f"{count} flows",
    )


def test_answers_and_streams_pass_through_as_they_are_made_from_both_nodes(cluster: Cluster, upstream: FakeUpstream):
    assert chat(cluster).startswith("Hello from the fake upstream")
    upstream.stream_chunks, upstream.stream_delay = 6, 0.25
    stream = openai_client(cluster).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if not pieces:
                # The first words are here while upstream is still writing: nothing held them back.
                assert b"[DONE]" not in b"".join(upstream.streams[-1])
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) == 6 and b"[DONE]" in b"".join(upstream.streams[-1])
    upstream.stream_delay = 0
    for _ in range(6):
        assert chat(cluster)
    served = cluster.served_by(8)
    assert len(served) == 8 and set(served) == {"keyrotor-1", "keyrotor-2"}  # spread over both nodes
    assert len(rows(cluster, 8)) == 8  # every request recorded once, by the node that served it


def test_a_stopped_node_leaves_the_other_serving_every_request(cluster: Cluster, upstream: FakeUpstream):
    for _ in range(2):
        assert chat(cluster)
    assert set(cluster.served_by(2)) == {"keyrotor-1", "keyrotor-2"}
    cluster.nodes["keyrotor-1"].stop_proxy()  # as `docker stop` does: SIGTERM, requests in flight finish
    answers = [chat(cluster) for _ in range(6)]  # no retries in the client: nginx alone moves them
    assert all(answers)
    served = cluster.served_by(8)
    assert len(served) == 8 and set(served[2:]) == {"keyrotor-2"}
    assert len(upstream.received) == 8
    cluster.nodes["keyrotor-2"].stop_proxy()
    with pytest.raises(openai.InternalServerError) as raised:
        chat(cluster)
    assert raised.value.status_code == 503 and raised.value.code == "gateway_unavailable"
    assert raised.value.response.headers["x-keyrotor-error"] == "gateway_unavailable"


@pytest.mark.parametrize("cluster", [True], indirect=True, ids=["with the UI"])
def test_the_clients_address_reaches_keyrotor_whatever_it_writes(cluster: Cluster, upstream: FakeUpstream):
    near = cluster.near_key  # allowed from 127.0.0.2 only
    assert chat(cluster, near, source="127.0.0.2")
    with pytest.raises(openai.PermissionDeniedError) as raised:
        chat(cluster, near, source="127.0.0.3")
    assert raised.value.code == "ip_not_allowed" and "127.0.0.3" in raised.value.message
    with pytest.raises(openai.PermissionDeniedError) as raised:  # claiming the allowed address
        chat(cluster, near, source="127.0.0.3", extra_headers={"x-forwarded-for": "127.0.0.2"})
    assert "127.0.0.3" in raised.value.message
    sql = "SELECT client_addr FROM flows WHERE client_id = (SELECT id FROM clients WHERE name = 'near') ORDER BY started_at"
    recorded = wait_for(lambda: len(r := cluster.keyrotor.query(sql)) >= 3 and r, what="3 flows")
    assert [r["client_addr"] for r in recorded] == ["127.0.0.2", "127.0.0.3", "127.0.0.3"]
    assert [r.headers.get("x-forwarded-for") for r in upstream.received] == [None]  # no client's address upstream
    # The UI behind nginx sees the same: a wrong admin key is audited with the caller's address.
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.4")) as ui:
        refused = ui.get(
            f"{cluster.nginx.ui_url}/api/clients",
            headers={"authorization": "Bearer kra-wrong-admin-key-0000000000000", "x-forwarded-for": "192.0.2.1"},
        )
    assert refused.status_code == 401
    audited = wait_for(lambda: cluster.keyrotor.query("SELECT address FROM audit_log WHERE address IS NOT NULL"))
    assert [r["address"] for r in audited] == ["127.0.0.4"]


@pytest.mark.parametrize("cluster", [True], indirect=True, ids=["with the UI"])
def test_realtime_health_and_refusals_through_nginx(cluster: Cluster, upstream: FakeUpstream):
    url = f"ws://127.0.0.1:{cluster.nginx.proxy_port}/v1/realtime?model=gpt-realtime"
    protocol, heard = asyncio.run(converse(url, additional_headers={"Authorization": f"Bearer {cluster.client_key}"}))
    assert heard[0]["type"] == "session.created" and heard[-1]["type"] == "response.done"
    (upgrade,) = upstream.received
    assert upgrade.path.startswith("/v1/realtime")
    # What compose's health check of nginx asks: a node's /health through the UI port.
    health = httpx.get(f"{cluster.nginx.ui_url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert httpx.get(f"{cluster.nginx.ui_url}/api/clients", headers={"authorization": f"Bearer {ADMIN_KEY}"}).is_success
    # An upload above keyrotor's limit is refused by nginx at its headers, the way keyrotor would.
    with socket.create_connection(("127.0.0.1", cluster.nginx.proxy_port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer x\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 104857601\r\n\r\n"
        )
        answer = b""
        while (chunk := sock.recv(65536)) and b"}" not in answer:
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"x-keyrotor-error: request_too_large" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert len(upstream.received) == 1  # nothing of it reached a node's upstream
