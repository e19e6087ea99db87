"""The model checked is the model sent: decoy bodies end to end, through a real mitmproxy running keyrotor.

A client allowed only gpt-4o-mini names another model where upstream acts on it (the top-level
key, the form field, Realtime's URL) and gpt-4o-mini where a first-"model" reader would look
(nested in `metadata`, a message, a tool, a duplicate key, a form's preamble). Each request is
refused, or served as gpt-4o-mini: what the fake upstream received says which model it served.
The official openai client sends every JSON body (raw bytes through its `post(content=...)`), httpx
the raw forms, `websockets` the Realtime session.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import parse_qs

import httpx
import openai
import pytest
import websockets

from tests.conftest import Keyrotor, wait_for
from tests.fake_upstream import FakeUpstream, Received, form_fields

GOOD = ["sk-good-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001"]
ALLOWED = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say hello to the proxy"}]
MESSAGES_JSON = json.dumps(MESSAGES)
JSON = "application/json"
FORM = "multipart/form-data; boundary=XyZ"
TOOL = {
    "type": "function",
    "function": {
        "name": "pick",
        "parameters": {"type": "object", "properties": {"model": {"type": "string", "enum": [ALLOWED]}}},
    },
}


def part(name: str, value: bytes, head: str = "") -> bytes:
    return f'--XyZ\r\nContent-Disposition: form-data; name="{name}"{head}\r\n\r\n'.encode() + value + b"\r\n"


AUDIO = part("file", b"RIFF\x00\x00\x00\x00WAVEfmt ", '; filename="a.wav"\r\nContent-Type: audio/wav')


def acted_on(received: Received) -> str | None:
    """The model the fake upstream served for a request, read as it reads it (Python's parsers: the
    last of two duplicates wins)."""
    if "upgrade" in received.headers:
        return (parse_qs(received.query).get("model") or [None])[-1]
    content_type = received.headers.get("content-type", "")
    if "multipart/form-data" in content_type:
        field = form_fields(content_type, received.body).get("model")
        return field[0].decode() if field else None
    model = json.loads(received.body).get("model")
    return model if isinstance(model, str) else None


def client_for(kr: Keyrotor, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=kr.base_url, api_key=key, max_retries=0, timeout=20)


def raw(path: str, content: bytes, content_type: str = JSON) -> Callable[[openai.OpenAI], object]:
    def send(client: openai.OpenAI) -> object:
        if content_type.startswith("multipart/"):
            # The SDK builds forms itself and takes no raw one: httpx, which it runs on, sends these bytes.
            headers = {"authorization": f"Bearer {client.api_key}", "content-type": content_type}
            answer = httpx.post(f"{client.base_url}{path.lstrip('/')}", content=content, headers=headers, timeout=20)
            if answer.status_code >= 400:
                raise openai.APIStatusError("refused", response=answer, body=answer.json())
            return answer.json()
        return client.post(path, cast_to=object, content=content, options={"headers": {"content-type": content_type}})

    return send


def ordered(body: dict) -> Callable[[openai.OpenAI], object]:
    """A JSON body whose keys go in this order (the SDK's own methods put `messages` first)."""
    return raw("/chat/completions", json.dumps(body).encode())


def chat_with_a_decoy_message(client: openai.OpenAI, stream: bool = False) -> object:
    messages = [{"role": "user", "content": "Say hello", "model": ALLOWED}]  # the SDK sends `model` first
    answer = client.chat.completions.create(model="gpt-4o", messages=messages, stream=stream)
    return list(answer) if stream else answer


def realtime(kr: Keyrotor, key: str) -> Callable[[openai.OpenAI], object]:
    async def session() -> None:
        url = f"ws://127.0.0.1:{kr.proxy_port}/v1/realtime?model=gpt-realtime"
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.recv()  # session.created

    return lambda _client: asyncio.run(session())


def decoys(kr: Keyrotor, key: str) -> list[tuple[str, Callable[[openai.OpenAI], object]]]:
    return [
        ("a decoy in a message, through the SDK", chat_with_a_decoy_message),
        ("the same, streamed", lambda client: chat_with_a_decoy_message(client, stream=True)),
        ("a message first", ordered({"messages": [{**MESSAGES[0], "model": ALLOWED}], "model": "gpt-4o"})),
        ("metadata first", ordered({"metadata": {"model": ALLOWED}, "model": "gpt-4o", "messages": MESSAGES})),
        ("a tool's schema first", ordered({"tools": [TOOL], "model": "gpt-4o", "messages": MESSAGES})),
        (
            "a duplicate key, allowed one first",
            raw("/chat/completions", f'{{"model": "{ALLOWED}", "model": "gpt-4o", "messages": {MESSAGES_JSON}}}'.encode()),
        ),
        (
            "a duplicate key, allowed one last",
            raw("/chat/completions", f'{{"model": "gpt-4o", "model": "{ALLOWED}", "messages": {MESSAGES_JSON}}}'.encode()),
        ),
        (
            "an escaped top-level key after a nested one",
            raw(
                "/chat/completions",
                f'{{"metadata": {{"model": "{ALLOWED}"}}, "mod\\u0065l": "gpt-4o", "messages": {MESSAGES_JSON}}}'.encode(),
            ),
        ),
        (
            "the key in another case",
            raw("/chat/completions", f'{{"model": "{ALLOWED}", "Model": "gpt-4o", "messages": {MESSAGES_JSON}}}'.encode()),
        ),
        (
            "a form's duplicate field",
            raw("/audio/transcriptions", AUDIO + part("model", ALLOWED.encode()) + part("model", b"gpt-4o-transcribe") + b"--XyZ--\r\n", FORM),
        ),
        (
            "a form's preamble",
            raw(
                "/audio/transcriptions",
                b'Content-Disposition: form-data; name="model"\r\n\r\n' + ALLOWED.encode() + b"\r\n"
                + AUDIO + part("model", b"gpt-4o-transcribe") + b"--XyZ--\r\n",
                FORM,
            ),
        ),
        ("a Realtime session's URL", realtime(kr, key)),
    ]  # fmt: skip


def test_decoy_bodies_are_refused_or_served_as_the_allowed_model(keyrotor: Keyrotor, upstream: FakeUpstream):
    keyrotor.add_keys(*GOOD)
    key = keyrotor.setup("clients", "add", "mini-only", "--models", ALLOWED).stdout.strip().splitlines()[-1]
    keyrotor.start_proxy()
    client = client_for(keyrotor, key)
    wrong, outcomes = [], {}
    for name, send in decoys(keyrotor, key):
        before = len(upstream.received)
        try:
            send(client)
            status = 200
        except openai.APIStatusError as e:
            status = e.status_code
        except websockets.InvalidStatus as e:
            status = e.response.status_code
        served = [acted_on(r) for r in upstream.received[before:]]
        outcomes[name] = (status, served)
        if any(model != ALLOWED for model in served) or (status < 400) != bool(served):
            wrong.append(name)
    assert not wrong, f"served with the wrong model: {len(wrong)} of {len(outcomes)}: {outcomes}"
    # Each refusal is the client's own fault, said in OpenAI's shape: 403 for a model it may not use,
    # 400 where the request names its model twice or in a spelling parsers read differently.
    assert {name: status for name, (status, _) in outcomes.items()} == {
        "a decoy in a message, through the SDK": 403,
        "the same, streamed": 403,
        "a message first": 403,
        "metadata first": 403,
        "a tool's schema first": 403,
        "a duplicate key, allowed one first": 400,
        "a duplicate key, allowed one last": 400,
        "an escaped top-level key after a nested one": 403,
        "the key in another case": 400,
        "a form's duplicate field": 400,
        "a form's preamble": 403,
        "a Realtime session's URL": 403,
    }
    assert not upstream.received


def test_a_request_is_charged_at_the_price_of_the_model_served(keyrotor: Keyrotor, upstream: FakeUpstream):
    keyrotor.add_keys(*GOOD)
    key = keyrotor.setup("clients", "add", "mini-only", "--models", ALLOWED, "--daily-usd", "100")
    key = key.stdout.strip().splitlines()[-1]
    keyrotor.start_proxy()
    client = client_for(keyrotor, key)
    # A body that mentions a dearer model where it is not the request's model is served, as its own.
    with pytest.raises(openai.BadRequestError) as refused:
        ordered({"model": ALLOWED, "model ": "x", "Model": "gpt-4o", "messages": MESSAGES})(client)
    assert refused.value.code == "ambiguous_model" and "'Model'" in refused.value.message
    answer = ordered({"metadata": {"model": "gpt-4o"}, "model": ALLOWED, "messages": MESSAGES})(client)
    assert isinstance(answer, dict) and answer["model"] == ALLOWED
    assert [acted_on(r) for r in upstream.received] == [ALLOWED]
    usage = answer["usage"]
    price = (usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.60) / 1e6  # prices.toml's gpt-4o-mini
    rows = wait_for(lambda: len(r := keyrotor.query("SELECT * FROM flows ORDER BY id")) >= 2 and r, what="2 rows")
    assert rows[0]["refusal"] == "ambiguous_model" and rows[0]["error"].startswith("ambiguous_model: ")
    assert rows[1]["model"] == ALLOWED and math.isclose(rows[1]["cost"], price)
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    counter = f"spend:{rows[1]['client_id']}:usd:day:{day}"
    spent = wait_for(
        lambda: keyrotor.query("SELECT value FROM limit_counters WHERE name = ?", (counter,)), what="the day's spend"
    )
    assert math.isclose(spent[0]["value"], price)
