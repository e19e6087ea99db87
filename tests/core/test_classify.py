"""The classification table: real OpenAI and Azure error bodies and headers, and what each means for the key."""

from __future__ import annotations

import json
from email.utils import formatdate

import pytest
from httpx import Headers

from core.classify import (
    Outcome,
    classify_response,
    is_context_too_long,
    parse_duration,
    ratelimit_reset_seconds,
    retry_after_seconds,
)

NOW = 1_800_000_000.0


def body(code: str | None, message: str = "", type_: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


OPENAI_RATE_LIMIT = body(
    "rate_limit_exceeded",
    "Rate limit reached for gpt-4o-mini in organization org-x on requests"
    " per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.",
    "requests",
)
OPENAI_TOKENS_LIMIT = body(
    "rate_limit_exceeded",
    "Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000,"
    " Used 29000, Requested 2000. Please try again in 6m0s.",
    "tokens",
)
OPENAI_TOO_LARGE = body(
    "rate_limit_exceeded",
    "Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 45000."
    " The input or output tokens must be reduced in order to run successfully.",
    "tokens",
)
OPENAI_QUOTA = body(
    "insufficient_quota",
    "You exceeded your current quota, please check your plan and billing details.",
    "insufficient_quota",
)
OPENAI_INVALID = body(
    "invalid_api_key",
    "Incorrect API key provided: sk-abc*****wxyz. You can find your API key at"
    " https://platform.openai.com/account/api-keys.",
)
OPENAI_DEACTIVATED = body("account_deactivated", "This key is associated with a deactivated account.")
OPENAI_500 = body(None, "The server had an error while processing your request. Sorry about that!", "server_error")
OPENAI_503 = body(None, "The engine is currently overloaded, please try again later", "server_error")
AZURE_429 = json.dumps(
    {
        "error": {
            "code": "429",
            "message": "Requests to the ChatCompletions_Create Operation under"
            " Azure OpenAI API version 2024-02-01 have exceeded token rate limit of your current OpenAI S0"
            " pricing tier. Please retry after 6 seconds.",
        }
    }
).encode()
AZURE_401 = json.dumps(
    {
        "error": {
            "code": "401",
            "message": "Access denied due to invalid subscription key or wrong"
            " API endpoint. Make sure to provide a valid key for an active subscription.",
        }
    }
).encode()
AZURE_QUOTA = json.dumps(
    {"error": {"code": "InsufficientQuota", "message": "The specified capacity exceeds the quota."}}
).encode()
OPENAI_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-limit-tokens": "30000",
    "x-ratelimit-remaining-tokens": "0",
    "x-ratelimit-reset-tokens": "6m0s",
}


@pytest.mark.parametrize(
    "status, headers, content, expected",
    [
        (200, {}, None, Outcome("ok")),
        (201, {}, None, Outcome("ok")),
        (401, {}, OPENAI_INVALID, Outcome("invalid", "401 invalid_api_key")),
        (401, {}, OPENAI_DEACTIVATED, Outcome("invalid", "401 account_deactivated")),
        (
            403,
            {},
            body("unsupported_country_region_territory"),
            Outcome("invalid", "403 unsupported_country_region_territory"),
        ),
        (401, {}, AZURE_401, Outcome("invalid", "401 401")),
        (401, {}, b"<html>not json</html>", Outcome("invalid", "401 unauthorized")),
        (429, {"retry-after": "20"}, OPENAI_RATE_LIMIT, Outcome("rate_limited", "429 rate_limit_exceeded", 20)),
        (429, {"retry-after": "1.5"}, OPENAI_RATE_LIMIT, Outcome("rate_limited", "429 rate_limit_exceeded", 1.5)),
        (
            429,
            {"retry-after": formatdate(NOW + 120, usegmt=True)},
            OPENAI_RATE_LIMIT,
            Outcome("rate_limited", "429 rate_limit_exceeded", 120),
        ),
        (
            429,
            {"retry-after-ms": "250", "retry-after": "1"},
            OPENAI_RATE_LIMIT,
            Outcome("rate_limited", "429 rate_limit_exceeded", 0.25),
        ),
        # No Retry-After: the reset of the limit that ran out (tokens here), not the other one.
        (429, OPENAI_LIMIT_HEADERS, OPENAI_TOKENS_LIMIT, Outcome("rate_limited", "429 rate_limit_exceeded", 360)),
        (
            429,
            {"x-ratelimit-reset-requests": "1.5s"},
            OPENAI_RATE_LIMIT,
            Outcome("rate_limited", "429 rate_limit_exceeded", 1.5),
        ),
        (429, {}, OPENAI_RATE_LIMIT, Outcome("rate_limited", "429 rate_limit_exceeded", None)),
        (429, {"retry-after": "6"}, AZURE_429, Outcome("rate_limited", "429 429", 6)),
        (429, {}, OPENAI_QUOTA, Outcome("exhausted", "429 insufficient_quota")),
        # Bigger than the whole limit: the request's fault, not the key's; no key can serve it.
        (429, {"retry-after": "20"}, OPENAI_TOO_LARGE, None),
        (429, {}, body("rate_limit_exceeded", "Limit 1000, Requested 5000.", "tokens"), None),
        (
            429,
            {},
            b'{"error": {"message": "You exceeded your current quota", "code": null}}',
            Outcome("exhausted", "429 insufficient_quota"),
        ),
        (429, {}, AZURE_QUOTA, Outcome("exhausted", "429 insufficient_quota")),
        (500, {}, OPENAI_500, Outcome("server_error", "500 server_error")),
        (502, {}, b"<html>Bad gateway</html>", Outcome("server_error", "502 server_error")),
        (503, {}, OPENAI_503, Outcome("server_error", "503 server_error")),
        (400, {}, body(None, "'messages' is a required property"), None),
        (404, {}, body("model_not_found"), None),
        (422, {}, body(None), None),
    ],
)
def test_classify_response(status, headers, content, expected):
    assert classify_response(status, Headers(headers), content, NOW) == expected


def test_only_key_reasons_are_key_failures():
    assert {
        o.kind
        for o in (Outcome(k) for k in ("invalid", "exhausted", "rate_limited", "server_error", "connection_error"))
        if o.is_key_failure
    } == {"invalid", "exhausted", "rate_limited", "server_error", "connection_error"}
    assert not Outcome("ok").is_key_failure


@pytest.mark.parametrize(
    "value, expected",
    [
        ("20", 20.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (formatdate(NOW + 30, usegmt=True), 30.0),
        (formatdate(NOW - 30, usegmt=True), 0.0),
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_seconds(value, expected):
    result = retry_after_seconds(Headers({"retry-after": value} if value else {}), NOW)
    assert result == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("6m0s", 360),
        ("1.5s", 1.5),
        ("20ms", 0.02),
        ("1h2m3s", 3723),
        ("2", 2),
        ("0s", 0),
        ("", None),
        ("soon", None),
        ("6m0sx", None),
        (None, None),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(
    "headers, seconds",
    [
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "30s"}, 30),
        (
            {
                "x-ratelimit-reset-requests": "2s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-tokens": "30s",
                "x-ratelimit-remaining-tokens": "500",
            },
            2,
        ),
        ({}, None),
    ],
)
def test_ratelimit_reset_seconds(headers, seconds):
    assert ratelimit_reset_seconds(Headers(headers)) == seconds


AZURE_CONTEXT = json.dumps(
    {
        "error": {
            "message": "This model's maximum context length is 8192 tokens. However, your messages resulted in"
            " 9000 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
            "status": 400,
        }
    }
).encode()


@pytest.mark.parametrize(
    ("status", "content", "too_long"),
    [
        (400, body("context_length_exceeded", "This model's maximum context length is 128000 tokens."), True),
        (400, AZURE_CONTEXT, True),
        (400, body(None, "This model's maximum context length is 4097 tokens."), True),  # a relay that drops the code
        (400, body("content_filter", "The response was filtered"), False),
        (400, body("invalid_request_error", "Invalid 'messages'"), False),
        (400, b"not json", False),
        (500, body("context_length_exceeded"), False),
    ],
    ids=["openai", "azure", "no code", "content filter", "other 400", "not json", "not a 400"],
)
def test_a_prompt_too_long_for_the_model(status, content, too_long):
    assert is_context_too_long(status, content) is too_long
