"""KeyPool: the pure decisions as tables, the hooks with mitmproxy's test helpers."""

from __future__ import annotations

import json
import sqlite3
import time
from email.utils import formatdate

import pytest
from mitmproxy import exceptions
from mitmproxy.http import Headers
from mitmproxy.test import taddons, tflow, tutils

from addons.keypool import KeyPool, Verdict, classify_response, is_usable, retry_after_seconds
from storage import db, secrets, upstream_keys, writer
from storage.upstream_keys import PoolKey
from tests.conftest import addon_context, wait_for

NOW = 1_800_000_000.0


def body(code: str | None, message: str = "", type_: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


OPENAI_RATE_LIMIT = body("rate_limit_exceeded", "Rate limit reached for gpt-4o-mini on requests per min (RPM)", "requests")
OPENAI_QUOTA = body("insufficient_quota", "You exceeded your current quota, please check your plan and billing details.",
                    "insufficient_quota")  # fmt: skip
AZURE_429 = json.dumps({"error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation under"
                        " Azure OpenAI API have exceeded token rate limit. Please retry after 6 seconds."}}).encode()  # fmt: skip
AZURE_401 = json.dumps({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong"
                        " API endpoint."}}).encode()  # fmt: skip


@pytest.mark.parametrize(
    "status, headers, content, expected",
    [
        (200, {}, None, Verdict("active")),
        (401, {}, body("invalid_api_key", "Incorrect API key provided"), Verdict("invalid", "401 invalid_api_key")),
        (401, {}, body("account_deactivated", "This key is associated with a deactivated account."),
         Verdict("invalid", "401 account_deactivated")),
        (403, {}, body("unsupported_country_region_territory"), Verdict("invalid", "403 unsupported_country_region_territory")),
        (401, {}, AZURE_401, Verdict("invalid", "401 401")),
        (401, {}, b"<html>not json</html>", Verdict("invalid", "401 unauthorized")),
        (429, {"retry-after": "20"}, OPENAI_RATE_LIMIT, Verdict("cooling", "429 rate_limit_exceeded", NOW + 20)),
        (429, {"retry-after": "1.5"}, OPENAI_RATE_LIMIT, Verdict("cooling", "429 rate_limit_exceeded", NOW + 1.5)),
        (429, {"retry-after": formatdate(NOW + 120, usegmt=True)}, OPENAI_RATE_LIMIT,
         Verdict("cooling", "429 rate_limit_exceeded", NOW + 120)),
        (429, {}, OPENAI_RATE_LIMIT, Verdict("cooling", "429 rate_limit_exceeded", NOW + 60)),
        (429, {"retry-after": "6"}, AZURE_429, Verdict("cooling", "429 429", NOW + 6)),
        (429, {}, OPENAI_QUOTA, Verdict("exhausted", "429 insufficient_quota")),
        (429, {}, b'{"error": {"message": "You exceeded your current quota", "code": null}}',
         Verdict("exhausted", "429 insufficient_quota")),
        (400, {}, body(None, "'messages' is a required property"), None),
        (404, {}, body("model_not_found"), None),
        (422, {}, body(None), None),
        (500, {}, body(None, "The server had an error", "server_error"), None),
    ],
)  # fmt: skip
def test_classify_response(status, headers, content, expected):
    assert classify_response(status, Headers(**headers), content, NOW, 60) == expected


@pytest.mark.parametrize(
    "value, expected",
    [("20", 20.0), ("0", 0.0), ("1.5", 1.5), (formatdate(NOW + 30, usegmt=True), 30.0),
     (formatdate(NOW - 30, usegmt=True), 0.0), ("soon", None), ("", None)],
)  # fmt: skip
def test_retry_after_seconds(value, expected):
    result = retry_after_seconds(Headers(**({"retry-after": value} if value else {})), NOW)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


@pytest.mark.parametrize(
    "state, cooldown_until, usable",
    [("active", None, True), ("cooling", NOW + 5, False), ("cooling", NOW - 1, True),
     ("invalid", None, False), ("exhausted", None, False), ("disabled", None, False)],
)  # fmt: skip
def test_is_usable(state, cooldown_until, usable):
    key = PoolKey(1, "sk-x", "xxxx", state, None, cooldown_until, 1.0, 0)
    assert is_usable(key, NOW) is usable


KEYS = ["sk-good-unit-aaaaaaaaaaaaaaaaaaaaa-0001", "sk-good-unit-bbbbbbbbbbbbbbbbbbbbb-0002",
        "sk-good-unit-ccccccccccccccccccccc-0003"]  # fmt: skip


@pytest.fixture
def pool_db(database):
    conn = db.connect(database)
    upstream_keys.add_keys(conn, secrets.key_cipher(database), KEYS)
    conn.close()
    return database


@pytest.fixture
def keypool(pool_db):
    pool = KeyPool()
    with addon_context(pool, pool_db):
        pool._writer = writer.acquire(pool_db)
        yield pool
        writer.release(pool._writer)


def send(keypool: KeyPool, flow: tflow.HTTPFlow) -> tflow.HTTPFlow:
    """The request hooks as mitmproxy's chain runs them: the pool first, its sender last."""
    keypool.request(flow)
    keypool.sender.request(flow)
    return flow


def authorised_flow(header: str = "authorization", value: str = "Bearer kr-client") -> tflow.HTTPFlow:
    flow = tflow.tflow()
    flow.request.headers[header] = value
    return flow


def test_round_robin_swaps_the_credential(keypool):
    seen = []
    for _ in range(4):
        flow = send(keypool, authorised_flow())
        seen.append(flow.request.headers["authorization"])
    assert seen == [f"Bearer {k}" for k in (KEYS[0], KEYS[1], KEYS[2], KEYS[0])]


def test_azure_style_header_keeps_its_form(keypool):
    flow = send(keypool, authorised_flow("api-key", "kr-client"))
    assert flow.request.headers["api-key"] == KEYS[0]
    assert "authorization" not in flow.request.headers


def test_unusable_keys_are_skipped(keypool):
    keypool.keys[0].state = "invalid"
    keypool.keys[1].state, keypool.keys[1].cooldown_until = "cooling", time.time() + 30
    for _ in range(3):
        flow = send(keypool, authorised_flow())
        assert flow.request.headers["authorization"] == f"Bearer {KEYS[2]}"


def test_no_usable_key_answers_503_with_soonest_retry_after(keypool):
    for key, wait in zip(keypool.keys, (None, 42, 17), strict=True):
        key.state, key.cooldown_until = ("invalid", None) if wait is None else ("cooling", time.time() + wait)
    flow = authorised_flow()
    keypool.request(flow)
    assert flow.response.status_code == 503
    assert flow.response.headers["retry-after"] in ("17", "18")
    assert json.loads(flow.response.content)["error"]["code"] == "no_upstream_key_available"


def test_answered_flows_are_left_alone(keypool):
    flow = authorised_flow()
    flow.response = tutils.tresp(status_code=401)
    keypool.request(flow)
    assert flow.request.headers["authorization"] == "Bearer kr-client"


def test_a_401_marks_the_key_invalid_in_memory_and_on_disk(keypool, pool_db):
    flow = authorised_flow()
    keypool.request(flow)
    flow.response = tutils.tresp(status_code=401, content=body("invalid_api_key"))
    keypool.response(flow)
    assert keypool.keys[0].state == "invalid"

    def stored_state():
        conn = sqlite3.connect(pool_db)
        state = conn.execute("SELECT state, state_reason FROM upstream_keys WHERE id = 1").fetchone()
        conn.close()
        return state == ("invalid", "401 invalid_api_key")

    wait_for(stored_state, what="the invalid state to be stored")


def test_a_success_after_cooldown_brings_the_key_back(keypool):
    key = keypool.keys[0]
    key.state, key.cooldown_until = "cooling", time.time() - 1
    flow = authorised_flow()
    keypool.request(flow)
    flow.response = tutils.tresp(status_code=200)
    keypool.response(flow)
    assert key.state == "active" and key.cooldown_until is None


def test_a_success_sent_before_a_429_does_not_undo_the_cooldown(keypool):
    early = send(keypool, authorised_flow())
    for _ in range(len(KEYS)):
        late = send(keypool, authorised_flow())  # round robin comes back to key 1
    late.response = tutils.tresp(status_code=429, headers=((b"retry-after", b"30"),), content=OPENAI_RATE_LIMIT)
    keypool.response(late)
    early.response = tutils.tresp(status_code=200)
    keypool.response(early)
    assert keypool.keys[0].state == "cooling"


def test_under_mitmweb_the_key_is_on_the_flow_only_while_the_request_leaves(keypool):
    keypool._late_send = True  # what running() decides when mitmweb's view is loaded
    flow = authorised_flow()
    keypool.request(flow)
    # What other addons (mitmweb's view among them) see during the request hook:
    assert flow.request.headers["authorization"] == "Bearer [upstream key #1 ...0001]"
    assert KEYS[0] not in str(flow.get_state())
    keypool.sender.request(flow)
    assert flow.request.headers["authorization"] == f"Bearer {KEYS[0]}"
    flow.response = tutils.tresp()
    keypool.responseheaders(flow)
    assert flow.request.headers["authorization"] == "Bearer [upstream key #1 ...0001]"
    assert KEYS[0] not in str(flow.get_state())


@pytest.mark.parametrize(
    "option, value, message",
    [("keypool_strategy", "fastest", "keypool_strategy must be one of"),
     ("keypool_cooldown_seconds", 0, "keypool_cooldown_seconds must be above zero")],
)  # fmt: skip
def test_bad_options_are_refused(option, value, message):
    pool = KeyPool()
    with taddons.context(pool) as tctx:
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(pool, **{option: value})


def test_under_mitmdump_the_key_is_hidden_once_the_request_has_left(keypool):
    flow = send(keypool, authorised_flow())
    assert flow.request.headers["authorization"] == f"Bearer {KEYS[0]}"
    flow.response = tutils.tresp()
    keypool.responseheaders(flow)
    assert flow.request.headers["authorization"] == "Bearer [upstream key #1 ...0001]"
