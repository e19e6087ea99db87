"""The JSON API's document, /api/openapi.json: every JSON twin under /api/ names the shape it answers,
and what the twins send is what those shapes declare."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.records import AttemptLog
from storage import db
from tests.monitor_ui.conftest import write_flows

ADMIN = "kra-openapi-test-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}

# Each JSON twin and the shape (monitor_ui/shapes.py) its success answers with.
TWINS = {
    ("get", "/api/alerts"): "AlertList",
    ("post", "/api/alerts/test"): "TestDelivery",
    ("get", "/api/audit"): "AuditEntries",
    ("get", "/api/clients"): "ClientList",
    ("post", "/api/clients"): "ClientCreated",
    ("get", "/api/clients/{client_id}"): "ClientDetail",
    ("patch", "/api/clients/{client_id}"): "ClientDetail",
    ("post", "/api/clients/{client_id}/keys"): "ClientKeyCreated",
    ("post", "/api/clients/{client_id}/keys/{key_id}/revoke"): "Done",
    ("post", "/api/clients/{client_id}/{action}"): "Done",
    ("get", "/api/dashboard"): "Dashboard",
    ("get", "/api/flows"): "FlowPage",
    ("get", "/api/flows/{flow_row_id}"): "FlowDetail",
    ("post", "/api/flows/{flow_row_id}/replay"): "Replayed",
    ("get", "/api/flows/compare"): "Comparison",
    ("post", "/api/flows/replays"): "ReplayJob",
    ("get", "/api/flows/replays/{job_id}"): "ReplayJob",
    ("get", "/api/groups"): "GroupList",
    ("post", "/api/groups"): "GroupDetail",
    ("get", "/api/groups/{group_id}"): "GroupDetail",
    ("put", "/api/groups/{group_id}"): "GroupDetail",
    ("delete", "/api/groups/{group_id}"): "GroupDeleted",
    ("post", "/api/groups/{group_id}/models"): "GroupDetail",
    ("post", "/api/groups/{group_id}/models/refresh"): "ModelsRefreshed",
    ("delete", "/api/groups/{group_id}/models/{model}"): "GroupDetail",
    ("post", "/api/groups/{group_id}/{action}"): "GroupDetail",
    ("get", "/api/keys"): "KeyPage",
    ("post", "/api/keys"): "KeysAdded",
    ("get", "/api/keys/{key_id}"): "Key",
    ("put", "/api/keys/{key_id}"): "Key",
    ("post", "/api/keys/{key_id}/weight"): "KeyWeight",
    ("post", "/api/keys/{key_id}/{action}"): "KeyChanged",
    ("post", "/api/keys/reset"): "KeysReset",
    ("post", "/api/keys/validate"): "Validations",
    ("get", "/api/models"): "ModelsOverview",
    ("put", "/api/models/{model}/fallbacks"): "FallbacksOf",
    ("get", "/api/playground"): "PlaygroundOptions",
    ("post", "/api/playground/chat"): "ChatCompletion",
    ("get", "/api/playground/conversations"): "PlaygroundConversations",
    ("get", "/api/playground/conversations/{conversation_id}"): "PlaygroundConversation",
    ("delete", "/api/playground/conversations/{conversation_id}"): "PlaygroundDeleted",
    ("get", "/api/upstreams"): "UpstreamList",
    ("post", "/api/upstreams"): "Upstream",
    ("get", "/api/upstreams/{name}"): "Upstream",
    ("put", "/api/upstreams/{name}"): "Upstream",
    ("delete", "/api/upstreams/{name}"): "UpstreamDeleted",
    ("post", "/api/upstreams/{name}/{action}"): "Upstream",
    ("get", "/api/traces"): "TraceList",
    ("post", "/api/traces"): "Trace",
    ("get", "/api/traces/{trace_id}"): "Trace",
    ("delete", "/api/traces/{trace_id}"): "TraceDeleted",
    ("get", "/api/traces/model/{model}"): "TraceList",
}
# Files, not JSON documents: their operations name no schema.
EXPORTS = {"/api/flows/export.jsonl", "/api/flows/export.har"}


@pytest.fixture
def client(open_ui) -> TestClient:
    return open_ui(ADMIN)


def test_every_json_twin_names_the_shape_it_answers(client: TestClient) -> None:
    spec = client.get("/api/openapi.json").json()
    answers = {}
    for path, operations in spec["paths"].items():
        if not path.startswith("/api/") or path in EXPORTS:
            continue
        for method, operation in operations.items():
            assert operation["tags"], (method, path)
            [success] = [code for code in operation["responses"] if code.startswith("2")]
            schema = operation["responses"][success]["content"]["application/json"]["schema"]
            answers[(method, path)] = schema["$ref"].rpartition("/")[2]
    assert answers == TWINS
    for name in set(TWINS.values()):
        assert spec["components"]["schemas"][name]["properties"], name


def _resolve(schema: dict, spec: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rpartition("/")[2]]
    return schema


def _option_for(value: Any, schema: dict, spec: dict) -> dict:
    """Of an anyOf, the option for the value's JSON type (objects and arrays are all the walk needs)."""
    wanted = "object" if isinstance(value, dict) else "array" if isinstance(value, list) else None
    for option in map(lambda s: _resolve(s, spec), schema.get("anyOf", [schema])):
        if option.get("type") == wanted or (wanted == "object" and "properties" in option):
            return option
    return {}


def undeclared(value: Any, schema: dict, spec: dict, where: str = "$") -> list[str]:
    """Where `value` has a key its schema does not declare."""
    schema = _option_for(value, _resolve(schema, spec), spec)
    found = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += undeclared(item, properties[key], spec, f"{where}.{key}")
            elif properties is not None:
                found.append(f"{where}.{key}")
            elif isinstance(extra, dict):
                found += undeclared(item, extra, spec, f"{where}.{key}")
    elif isinstance(value, list):
        positions = schema.get("prefixItems")
        for index, item in enumerate(value):
            item_schema = positions[index] if positions else schema.get("items", {})
            found += undeclared(item, item_schema, spec, f"{where}[{index}]")
    return found


def _seed_a_flow(path: Path) -> None:
    now = time.time()
    row = dict(
        flow_id="flow-1",
        started_at=now - 2,
        first_byte_at=now - 1.9,
        ended_at=now - 1.5,
        duration_ms=500.0,
        method="POST",
        path="/v1/chat/completions",
        status=200,
        model="gpt-4o",
        stream=1,
        client_key_id=1,
        upstream_key_id=1,
        attempts=2,
        prompt_tokens=10,
        completion_tokens=5,
        total_tokens=15,
        cost=0.0001,
        client_addr="127.0.0.1",
        request_headers=[["content-type", "application/json"]],
        response_headers=[["content-type", "text/event-stream"]],
        request_body=json.dumps({"model": "gpt-4o", "stream": True}),
        request_body_size=30,
        request_body_truncated=0,
        response_body='data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n',
        response_body_size=60,
        response_body_truncated=0,
        chunk_times=[[0, 46], [3.5, 14]],
        attempt_log=[
            AttemptLog(attempt=1, key_id=2, status=429, error=None, started_at=now - 2, duration_ms=3.0),
            AttemptLog(attempt=2, key_id=1, status=200, error=None, started_at=now - 1.99, duration_ms=490.0),
        ],
    )
    conn = db.connect(path)
    write_flows(conn, [row])
    conn.close()


def _seed_a_trace(path: Path, group_id: int) -> int:
    """A trace of gpt-4o through relay/cheap, answered, with one fetch of its image."""
    from core.traces import Answer
    from storage import traces

    conn = db.connect(path)
    try:
        row = traces.create(conn, group_id, "relay/cheap", "gpt-4o")
        traces.mark_sent(conn, row["id"], time.time())
        traces.record_fetch(conn, row["id"], time.time(), "203.0.113.9", [("user-agent", "Fetcher/1")], time.time())
        traces.record_answer(conn, row["id"], Answer(200, "gpt-4o", "fp_1", "A red square."), time.time())
        traces.finish(conn, row["id"], None)
        return int(row["id"])
    finally:
        conn.close()


def test_json_twins_send_only_what_their_shapes_declare(client: TestClient) -> None:
    spec = client.get("/api/openapi.json").json()
    answers = []

    def call(method: str, url: str, template: str, **kwargs: Any) -> dict:
        response = client.request(method, url, headers=AUTH, **kwargs)
        assert response.status_code < 300, (method, url, response.text)
        answers.append((method, url, template, response.json()))
        return response.json()

    call("POST", "/api/upstreams", "/api/upstreams", json={"name": "relay", "base_url": "https://relay.example/v1"})
    group = call("POST", "/api/groups", "/api/groups", json={"upstream": "relay", "name": "cheap"})["id"]
    call("POST", f"/api/groups/{group}/models", "/api/groups/{group_id}/models", json={"model": "gpt-4o"})
    call("PUT", "/api/models/gpt-4o/fallbacks", "/api/models/{model}/fallbacks", json={"fallbacks": ["gpt-4o-mini"]})
    keys = ["sk-openapi-aaaaaaaaaaaaaaaaaaaaaaaa0001", "sk-openapi-bbbbbbbbbbbbbbbbbbbbbbbb0002"]
    call("POST", "/api/keys", "/api/keys", json={"keys": keys, "group_id": group})
    call("POST", "/api/keys/1/disable", "/api/keys/{key_id}/{action}")
    call("POST", "/api/clients", "/api/clients", json={"name": "alice", "limits": {"rpm": 60, "daily_usd": 5}})
    call("POST", "/api/clients/1/keys", "/api/clients/{client_id}/keys")
    _seed_a_flow(client.app.state.settings.db_path)
    for template, url in [
        ("/api/audit", "/api/audit"),
        ("/api/clients", "/api/clients"),
        ("/api/clients/{client_id}", "/api/clients/1"),
        ("/api/dashboard", "/api/dashboard"),
        ("/api/flows", "/api/flows"),
        ("/api/flows/{flow_row_id}", "/api/flows/1"),
        ("/api/flows/compare", "/api/flows/compare?a=1&b=1"),
        ("/api/groups", "/api/groups"),
        ("/api/groups/{group_id}", f"/api/groups/{group}"),
        ("/api/keys", "/api/keys"),
        ("/api/keys/{key_id}", "/api/keys/1"),
        ("/api/models", "/api/models"),
        ("/api/playground", "/api/playground"),
        ("/api/playground/conversations", "/api/playground/conversations"),
        ("/api/upstreams", "/api/upstreams"),
        ("/api/upstreams/{name}", "/api/upstreams/relay"),
    ]:
        call("GET", url, template)
    trace = _seed_a_trace(client.app.state.settings.db_path, group)
    call("GET", "/api/traces", "/api/traces")
    call("GET", f"/api/traces/{trace}", "/api/traces/{trace_id}")
    call("GET", "/api/traces/model/gpt-4o", "/api/traces/model/{model}")
    call("DELETE", f"/api/traces/{trace}", "/api/traces/{trace_id}")
    call("DELETE", f"/api/groups/{group}", "/api/groups/{group_id}")
    call("DELETE", "/api/upstreams/relay", "/api/upstreams/{name}")

    for method, url, template, body in answers:
        operation = spec["paths"][template][method.lower()]
        [success] = [code for code in operation["responses"] if code.startswith("2")]
        schema = operation["responses"][success]["content"]["application/json"]["schema"]
        assert undeclared(body, schema, spec) == [], (method, url)
