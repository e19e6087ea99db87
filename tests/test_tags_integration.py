"""Tags, sessions and previews end to end: the openai client → a real proxy → the fake upstream, then the UI.

Invariants: the label headers are recorded with the client's own flow, filterable (UI, JSON twin),
never reach upstream (first try, retry, refusal), and a bad value is a 400 that changes nothing else.
Previews are the prompt's last user message and the answer, short, escaped wherever shown.
"""

from __future__ import annotations

import httpx
import markupsafe
import openai
import pytest

from tests.conftest import ADMIN_KEY, Keyrotor, stored_flows, wait_for
from tests.fake_upstream import FakeUpstream

GOOD = ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001", "sk-good-bbbbbbbbbbbbbbbbbbbbbbbbbbbb0002"]
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
SCRIPT = "<script>alert('owned')</script> & more"


def client_for(kr: Keyrotor, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=20)


def labelled_headers(upstream: FakeUpstream) -> list[dict[str, str]]:
    return [
        {k: v for k, v in r.headers.items() if k.startswith("x-keyrotor")}
        for r in upstream.received
        if any(k.startswith("x-keyrotor") for k in r.headers)
    ]


@pytest.fixture
def running(keyrotor: Keyrotor) -> tuple[Keyrotor, str, str]:
    alice = keyrotor.start_serving(*GOOD)
    bob = keyrotor.add_client("bob")
    keyrotor.start_ui()
    return keyrotor, alice, bob


def test_tags_and_session_are_recorded_filterable_and_never_sent_upstream(running, upstream: FakeUpstream):
    kr, alice, bob = running
    upstream.set_key(GOOD[0], "server_error", times=1)  # the first try fails: the retry must not carry them either
    client = client_for(kr, alice)
    tagged = {"x-keyrotor-tags": "nightly, eval:v2,nightly", "x-keyrotor-session": "conv-42"}
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Tagged hello"}], extra_headers=tagged
    )
    list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Streamed and tagged"}],
            stream=True,
            extra_headers={"x-keyrotor-tags": "stream"},
        )
    )
    client_for(kr, bob).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "untagged"}])
    rows = wait_for(lambda: (r := stored_flows(kr.db_path)) and len(r) >= 3 and r, what="3 rows")
    assert len(upstream.received) >= 4  # the retry happened
    assert labelled_headers(upstream) == []
    assert [(r["tags"], r["session"]) for r in rows] == [("nightly,eval:v2", "conv-42"), ("stream", None), (None, None)]
    # Not in the recorded request headers either: they are the row's own columns.
    assert not any(name.lower().startswith("x-keyrotor") for r in rows for name, _ in _headers(r))

    def found(**query: str) -> list[str | None]:
        answer = httpx.get(f"{kr.ui_url}/api/flows", params=query, headers=AUTH)
        assert answer.status_code == 200, answer.text
        return [f["tags"] for f in answer.json()["flows"]]

    assert found(tag="nightly") == ["nightly,eval:v2"]
    assert found(tag="eval:v2") == ["nightly,eval:v2"]
    assert found(tag="stream") == ["stream"]
    assert found(session="conv-42") == ["nightly,eval:v2"]
    assert found(tag="nightl") == []  # a whole tag, not a prefix
    assert found(tag="stream", session="conv-42") == []
    bad = httpx.get(f"{kr.ui_url}/api/flows", params={"tag": "a b"}, headers=AUTH)
    assert bad.status_code == 422 and "tag must be" in bad.json()["error"]["message"]
    page = httpx.get(f"{kr.ui_url}/flows", params={"tag": "nightly"}, headers=AUTH).text
    assert 'href="/flows?tag=eval%3Av2"' in page and "session conv-42" in page
    detail = httpx.get(f"{kr.ui_url}/flows/{rows[0]['id']}", headers=AUTH).text
    assert ">conv-42</a>" in detail and ">nightly</a>" in detail


def _headers(row: dict) -> list[list[str]]:
    import json

    return json.loads(row["request_headers"] or "[]")


@pytest.mark.parametrize(
    "headers, code",
    [
        ({"x-keyrotor-tags": "has space"}, "invalid_keyrotor_tags"),
        ({"x-keyrotor-tags": "<b>"}, "invalid_keyrotor_tags"),
        ({"x-keyrotor-tags": "x" * 65}, "invalid_keyrotor_tags"),
        ({"x-keyrotor-tags": ",".join(f"t{i}" for i in range(11))}, "invalid_keyrotor_tags"),
        ({"x-keyrotor-session": ""}, "invalid_keyrotor_session"),
        ({"x-keyrotor-session": "s" * 129}, "invalid_keyrotor_session"),
        ({"x-keyrotor-session": "a;b"}, "invalid_keyrotor_session"),
    ],
)
def test_a_bad_label_is_an_openai_shaped_400_and_nothing_goes_upstream(
    running, upstream: FakeUpstream, headers: dict[str, str], code: str
):
    kr, alice, _ = running
    before = len(upstream.received)
    client = client_for(kr, alice)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers=headers
        )
    assert raised.value.code == code
    assert raised.value.response.headers["x-keyrotor-error"] == code
    assert len(upstream.received) == before
    row = wait_for(lambda: (r := stored_flows(kr.db_path)) and r[-1], what="the refused row")
    assert row["status"] == 400 and row["refusal"] == code and row["tags"] is None and row["session"] is None


def test_an_unknown_key_with_labels_is_refused_as_before_and_records_none(running, upstream: FakeUpstream):
    kr, _, _ = running
    answer = httpx.post(
        f"{kr.base_url}/chat/completions",
        headers={"authorization": "Bearer sk-nobody-0000", "x-keyrotor-tags": "decoy", "x-keyrotor-session": "s1"},
        json={"model": "gpt-4o-mini", "messages": []},
    )
    assert answer.status_code == 401
    row = wait_for(lambda: (r := stored_flows(kr.db_path)) and r[-1], what="the refused row")
    assert row["tags"] is None and row["session"] is None and upstream.received == []


def test_previews_show_the_last_user_message_and_the_answer_escaped(running, upstream: FakeUpstream):
    kr, alice, _ = running
    client = client_for(kr, alice)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": SCRIPT}]},
    ]
    client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True))
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "long " * 200}])
    rows = wait_for(lambda: (r := stored_flows(kr.db_path)) and len(r) >= 3 and r, what="3 rows")
    answer = "Hello from the fake upstream. Your last message had 3 words."
    assert [(r["prompt_preview"], r["answer_preview"]) for r in rows[:2]] == [(SCRIPT, answer), (SCRIPT, answer)]
    assert len(rows[2]["prompt_preview"]) == 120 and rows[2]["prompt_preview"].endswith("…")
    page = httpx.get(f"{kr.ui_url}/flows", headers=AUTH).text
    assert "<script>alert" not in page
    assert str(markupsafe.escape(SCRIPT)) in page  # shown, as text
    listed = httpx.get(f"{kr.ui_url}/api/flows", headers=AUTH).json()["flows"]
    assert listed[-1]["prompt_preview"] == SCRIPT and listed[-1]["answer_preview"] == answer
