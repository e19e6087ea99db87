"""Flows whose bodies are bytes, and WebSocket sessions, as the UI shows and serves them: escaped, downloaded
as attachments only, with their JSON twins and exports carrying no raw bytes."""

from __future__ import annotations

import base64
import html
import json
import re

import pytest
from fastapi.testclient import TestClient

from tests.monitor_ui.test_ui_routes import (  # noqa: F401 (fixtures)
    AUTH,
    XSS_IMG,
    XSS_SCRIPT,
    admin_key_env,
    flow_row,
    log_in,
    make_client,
)

AUDIO = b"ID3\x04\x00\xff\xfb\x90\x64" * 30
EVIL_TYPE = f'text/html"><script>alert(1)</script>{XSS_IMG}'
MESSAGES = [
    [12.5, "server", "text", 40, json.dumps({"type": "session.created"})],
    [20.0, "client", "text", 30, json.dumps({"type": "conversation.item.create", "text": XSS_SCRIPT})],
    [25.0, "client", "binary", 1024, None],
    [31.0, "server", "text", 60, json.dumps({"type": "response.output_text.delta", "delta": XSS_IMG})],
]
ROWS = [
    flow_row(
        1,
        path="/v1/audio/speech",
        response_body=None,
        response_body_size=len(AUDIO),
        response_body_type="audio/mpeg",
        response_body_bytes=AUDIO,
        response_headers=[["content-type", "audio/mpeg"]],
    ),
    flow_row(2, response_body=None, response_body_type=EVIL_TYPE, response_body_bytes=b"<script>alert(1)</script>"),
    flow_row(
        3,
        method="GET",
        path="/v1/realtime?model=gpt-realtime",
        status=101,
        request_body=None,
        response_body=None,
        websocket_messages=MESSAGES,
    ),
]


@pytest.fixture
def browser(make_client) -> TestClient:  # noqa: F811 (the imported fixture)
    client = make_client(ROWS)
    log_in(client)
    return client


def test_a_binary_body_is_a_download_link_and_the_json_carries_no_bytes(browser):
    page = browser.get("/flows/1").text
    assert 'Binary body: audio/mpeg, 270 bytes kept — <a href="/flows/1/download/response" download>' in page
    detail = browser.get("/api/flows/1", headers=AUTH).json()
    assert "response_body_bytes" not in detail and detail["response_body_kept_bytes"] == len(AUDIO)
    download = browser.get("/flows/1/download/response")
    assert download.content == AUDIO
    assert download.headers["content-disposition"] == 'attachment; filename="flow-1-response.mp3"'


def test_a_captured_type_is_escaped_and_never_served_as_itself(browser):
    page = browser.get("/flows/2").text
    assert XSS_SCRIPT not in page and XSS_IMG not in page
    shown = re.search(r'<p class="binary-body">Binary body: (.*?), \d+ bytes kept', page)
    assert shown and html.unescape(shown.group(1)) == EVIL_TYPE  # shown as text
    download = browser.get("/flows/2/download/response")
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["content-disposition"] == 'attachment; filename="flow-2-response.bin"'
    assert download.headers["x-content-type-options"] == "nosniff"


def test_downloads_need_the_admin(make_client):  # noqa: F811
    client = make_client(ROWS)
    assert client.get("/flows/1/download/response").status_code == 401
    assert client.get("/flows/1/download/response", headers=AUTH).content == AUDIO
    assert client.get("/flows/1/download/request", headers=AUTH).status_code == 404  # a JSON request: text
    assert client.get("/flows/1/download/other", headers=AUTH).status_code == 422


def test_a_websocket_session_shows_each_message_escaped_with_its_direction_and_type(browser):
    page = browser.get("/flows/3").text
    assert "WebSocket messages (4)" in page
    assert XSS_SCRIPT not in page and XSS_IMG not in page
    assert "<td>client</td><td>conversation.item.create</td>" in page
    assert "<td>client</td><td>binary</td><td>binary, 1024 bytes</td>" in page
    detail = browser.get("/api/flows/3", headers=AUTH).json()
    assert [m["direction"] for m in detail["websocket_messages"]] == ["server", "client", "client", "server"]
    assert detail["streamed_text"] == XSS_IMG  # the session's text deltas, reassembled


def test_exports_carry_bytes_only_as_base64(browser):
    lines = browser.get("/api/flows/export.jsonl", headers=AUTH).text.splitlines()
    assert len(lines) == 3 and all("response_body_bytes" not in json.loads(line) for line in lines)
    entries = browser.get("/api/flows/export.har", headers=AUTH).json()["log"]["entries"]
    speech = next(e for e in entries if e["request"]["url"].endswith("/v1/audio/speech"))
    assert speech["response"]["content"]["encoding"] == "base64"
    assert base64.b64decode(speech["response"]["content"]["text"]) == AUDIO


def test_the_curl_of_an_upload_sends_its_fields_literally_and_its_file_from_the_download(make_client):  # noqa: F811
    form = {"model": "whisper-1", "prompt": "@/etc/passwd", "file": {"filename": "a.wav", "size": 3}}
    row = flow_row(
        1,
        path="/v1/audio/transcriptions",
        request_headers=[["content-type", "multipart/form-data; boundary=xyz"]],
        request_body=json.dumps(form),
        request_body_type="audio/wav",
        request_body_bytes=b"RIF",
    )
    curl = make_client([row]).get("/api/flows/1", headers=AUTH).json()["curl"]
    assert "--form-string model=whisper-1 --form-string prompt=@/etc/passwd -F file=@flow-1-request.wav" in curl
    assert "content-type" not in curl and "--data-raw" not in curl
