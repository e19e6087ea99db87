"""What keyrotor changed on the way (core/rewrites.py): kept compactly, shown without a secret, undone for a replay."""

from __future__ import annotations

import json

import pytest

from core.rewrites import body_changes, client_headers, client_request, rebuilt_body, request_diff, shown_value

CLIENT = json.dumps({"model": "gpt-4o", "messages": [], "stream": True}).encode()
SENT = json.dumps(
    {"model": "gpt-4o-2024-11-20", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
).encode()


def test_the_body_keeps_only_its_top_level_changes_and_rebuilds_the_client_s():
    changes = body_changes(CLIENT, SENT)
    assert changes == {"set": {"model": "gpt-4o"}, "drop": ["stream_options"]}
    assert json.loads(rebuilt_body(SENT.decode(), changes)) == json.loads(CLIENT)
    assert body_changes(CLIENT, CLIENT) is None and body_changes(b"not json", SENT) is None
    assert rebuilt_body("not json", changes) is None and rebuilt_body("raw text", None) == "raw text"


@pytest.mark.parametrize(
    "name, value, shown",
    [
        ("Authorization", "Bearer [upstream key #3 ...abcd]", "Bearer [upstream key #3 ...abcd]"),
        ("authorization", "Bearer [client key #12]", "Bearer [client key #12]"),
        ("api-key", "[upstream key #7 ...0f1e]", "[upstream key #7 ...0f1e]"),
        ("authorization", "Bearer [pass for client #2]", "Bearer [pass for client #2]"),
        ("authorization", "Bearer sk-live-secret", "[redacted]"),
        ("authorization", "Bearer [sk-live-secret-in-brackets]", "[redacted]"),
        ("api-key", "[upstream key #7 ...0f1e] sk-more", "[redacted]"),
        ("cookie", "session=abc", "[redacted]"),
        ("content-type", "application/json", "application/json"),
    ],
)
def test_a_credential_shows_only_as_keyrotor_s_placeholder(name, value, shown):
    assert shown_value(name, value) == shown


def test_the_diff_shows_the_path_headers_and_body_keyrotor_changed():
    kept = client_request(
        "/v1/chat/completions",
        ((b"Authorization", b"Bearer [client key #1]"), (b"X-Trace", b"t"), (b"Accept-Encoding", b"gzip")),
        CLIENT,
        "/openai/deployments/d/chat/completions?api-version=1",
        "https://res.example/openai/deployments/d/chat/completions?api-version=1",
        ((b"api-key", b"[upstream key #4 ...wxyz]"), (b"X-Trace", b"t"), (b"Accept-Encoding", b"identity")),
        SENT,
    )
    assert kept["path"] == "/v1/chat/completions"
    shown = {
        (c.where, c.name.lower()): c
        for c in request_diff(
            "POST",
            "/x",
            [["api-key", "[redacted]"], ["X-Trace", "t"], ["Accept-Encoding", "identity"]],
            SENT.decode(),
            kept,
        )
    }
    assert (
        shown[("line", "request")].sent
        == "POST https://res.example/openai/deployments/d/chat/completions?api-version=1"
    )
    assert shown[("header", "authorization")].kind == "removed"
    assert (
        shown[("header", "api-key")].sent == "[upstream key #4 ...wxyz]"
        and shown[("header", "api-key")].kind == "added"
    )
    assert (
        shown[("header", "accept-encoding")].client == "gzip"
        and shown[("header", "accept-encoding")].sent == "identity"
    )
    assert ("header", "x-trace") not in shown
    assert shown[("body", "model")].client == "gpt-4o" and shown[("body", "model")].sent == "gpt-4o-2024-11-20"
    assert shown[("body", "stream_options")].kind == "added"
    assert request_diff("POST", "/x", [], None, None) == []


def test_the_client_s_headers_are_rebuilt_from_the_sent_ones_and_what_differed():
    client = ((b"Authorization", b"Bearer [client key #1]"), (b"X-Trace", b"t"), (b"Accept-Encoding", b"gzip"))
    sent = ((b"X-Trace", b"t"), (b"Accept-Encoding", b"identity"), (b"api-key", b"[upstream key #4 ...wxyz]"))
    kept = client_request("/p", client, None, "/p", "https://up/p", sent, None)
    assert kept["headers"] == [["Authorization", "Bearer [client key #1]"], ["Accept-Encoding", "gzip"]]
    assert kept["added"] == ["api-key"] and "body" not in kept and "path" not in kept
    recorded = [["X-Trace", "t"], ["Accept-Encoding", "identity"], ["api-key", "[redacted]"]]
    assert client_headers(recorded, kept) == [
        ("X-Trace", "t"),
        ("Accept-Encoding", "gzip"),
        ("Authorization", "Bearer [client key #1]"),
    ]
    assert client_headers(recorded, None) == [tuple(h) for h in recorded]
