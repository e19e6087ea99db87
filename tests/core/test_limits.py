"""Client limits decided over in-memory counters: plain functions and a Governor, no proxy."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from core.limits import (
    ClientPolicy,
    Governor,
    LimitError,
    Refusal,
    Ticket,
    batch_input_refusal,
    duration,
    estimate_tokens,
    ip_allowed,
    is_upload,
    model_allowed,
    networks_of,
    next_month,
    output_allowance,
    parse_limit,
    policy_with,
    reservation,
    spend_names,
    upload_refusal,
)
from core.prices import Price, PriceTable
from storage.counters import MemoryCounters

NOW = datetime(2026, 12, 31, 23, 59, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "patterns, model, allowed",
    [
        ((), "anything", True),
        (("gpt-4o*",), "gpt-4o-mini", True),
        (("gpt-4o*",), "gpt-4o", True),
        (("gpt-4o*",), "gpt-4.1", False),
        (("gpt-4o",), "gpt-4o-mini", False),
        (("*-mini",), "o4-mini", True),
        (("a.b",), "aXb", False),  # a dot is a dot, not any character
        (("gpt-4o",), None, True),  # no model in the request: nothing to refuse
    ],
)
def test_model_allowlist(patterns, model, allowed):
    assert model_allowed(patterns, model) is allowed


@pytest.mark.parametrize(
    "ips, address, allowed",
    [
        ((), "203.0.113.9", True),
        (("10.0.0.0/8",), "10.1.2.3", True),
        (("10.0.0.0/8",), "11.1.2.3", False),
        (("127.0.0.1",), "::ffff:127.0.0.1", True),  # a dual-stack listener's view of a v4 client
        (("2001:db8::/32",), "2001:db8::1", True),
        (("2001:db8::/32",), "10.1.2.3", False),
        (("10.0.0.0/8",), None, False),
        (("10.0.0.0/8",), "not-an-ip", False),
    ],
)
def test_ip_allowlist(ips, address, allowed):
    assert ip_allowed(networks_of(ips), address) is allowed


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("rpm", "60", 60),
        ("rpm", "none", None),
        ("models", "gpt-4o*, o3 ,gpt-4o*", ("gpt-4o*", "o3")),
        ("models", "none", ()),
        ("daily_usd", "$2.50", 2.5),
        ("expires_at", "2027-01-01", datetime(2027, 1, 1, tzinfo=UTC).timestamp()),
        ("expires_at", "2027-01-01T12:00+02:00", datetime(2027, 1, 1, 10, tzinfo=UTC).timestamp()),
        ("ips", "10.0.0.0/8,::1", ("10.0.0.0/8", "::1")),
    ],
)
def test_limits_parse_as_given(name, text, value):
    assert parse_limit(name, text) == value


@pytest.mark.parametrize(
    "name, text, says",
    [
        ("rpm", "0", "from 1"),
        ("tpm", "1.5", "whole number"),
        ("daily_usd", "-1", "above 0"),
        ("expires_at", "soon", "ISO date"),
        ("ips", "10.0.0.300", "not an IP"),
        ("groups", "nogroup", "UPSTREAM/GROUP"),
    ],
)
def test_bad_limits_say_why(name, text, says):
    with pytest.raises(LimitError, match=says):
        parse_limit(name, text)


def governor() -> Governor:
    return Governor(MemoryCounters())


def test_rpm_admits_exactly_n_in_a_moving_window_and_says_when_to_retry():
    g, policy = governor(), ClientPolicy(rpm=3)
    outcomes = [g.admit(f"f{i}", 1, policy, None, b"", None, NOW + i) for i in range(5)]
    assert [type(o) for o in outcomes] == [Ticket, Ticket, Ticket, Refusal, Refusal]
    refusal = outcomes[3]
    assert refusal.code == "rate_limit_exceeded" and refusal.error.status == 429
    assert refusal.error.headers["retry-after"] == "57"  # the first leaves the window at NOW + 60
    assert refusal.error.headers["x-ratelimit-remaining-requests"] == "0"
    assert isinstance(g.admit("late", 1, policy, None, b"", None, NOW + 60.5), Ticket)
    assert isinstance(g.admit("other client", 2, policy, None, b"", None, NOW + 3), Ticket)


def test_tpm_reserves_the_estimate_and_settles_to_what_was_reported():
    g, policy = governor(), ClientPolicy(tpm=1000)
    body = b'{"model": "m", "max_tokens": 500, "messages": []}'
    assert estimate_tokens(body) == len(body) // 4 + 500
    assert isinstance(g.admit("a", 1, policy, None, body, None, NOW), Ticket)
    assert isinstance(g.admit("b", 1, policy, None, b"x" * 2000, None, NOW), Refusal)  # 512 + 500 would pass 1000
    g.settle("a", {"total_tokens": 30}, None, NOW + 1)
    assert isinstance(g.admit("b", 1, policy, None, b"x" * 2000, None, NOW + 1), Ticket)
    assert g.rate_headers(1, policy, NOW + 1)["x-ratelimit-remaining-tokens"] == str(1000 - 30 - 500)


def test_budget_lets_the_admitted_request_finish_and_refuses_the_next_until_it_renews():
    g, policy = governor(), ClientPolicy(monthly_tokens=100, daily_usd=1.0)
    assert isinstance(g.admit("a", 1, policy, None, b"", None, NOW), Ticket)
    assert isinstance(g.admit("b", 1, policy, None, b"", None, NOW), Ticket)  # both under budget when admitted
    g.settle("a", {"total_tokens": 80}, 0.1, NOW)
    g.settle("b", {"total_tokens": 80}, 0.1, NOW)
    refusal = g.admit("c", 1, policy, None, b"", None, NOW)
    assert refusal.code == "insufficient_quota" and refusal.error.status == 429
    assert "monthly token budget of 100 tokens is spent (160 tokens)" in refusal.error.message
    assert "renews at 2027-01-01T00:00:00Z" in refusal.error.message
    assert refusal.error.headers["x-should-retry"] == "false"
    assert isinstance(g.admit("d", 1, policy, None, b"", None, next_month(NOW)), Ticket)


def test_parallel_slots_free_when_requests_end():
    g, policy = governor(), ClientPolicy(max_parallel=2)
    assert isinstance(g.admit("a", 1, policy, None, b"", None, NOW), Ticket)
    assert isinstance(g.admit("b", 1, policy, None, b"", None, NOW), Ticket)
    assert isinstance(g.admit("c", 1, policy, None, b"", None, NOW), Refusal)
    g.settle("a", None, None, NOW)
    g.settle("a", None, None, NOW)  # settling twice frees one slot only
    assert isinstance(g.admit("c", 1, policy, None, b"", None, NOW), Ticket)
    assert isinstance(g.admit("d", 1, policy, None, b"", None, NOW), Refusal)


def test_a_refused_request_takes_nothing_from_the_other_limits():
    g, policy = governor(), ClientPolicy(rpm=1, tpm=10)
    assert isinstance(g.admit("big", 1, policy, None, b"x" * 400, None, NOW), Ticket)  # the estimate is capped at tpm
    assert g.admit("next", 1, ClientPolicy(rpm=5, tpm=10), None, b"x" * 8, None, NOW).code == "rate_limit_exceeded"
    assert g.rate_headers(1, ClientPolicy(rpm=5), NOW)["x-ratelimit-remaining-requests"] == "4"


def test_expiry_and_address_are_checked_at_the_headers():
    policy = ClientPolicy(expires_at=NOW, ips=("10.0.0.0/8",))
    assert Governor.check_key(policy, networks_of(policy.ips), "10.0.0.1", NOW - 1) is None
    assert Governor.check_key(policy, networks_of(policy.ips), "10.0.0.1", NOW).code == "key_expired"
    refusal = Governor.check_key(ClientPolicy(ips=("10.0.0.0/8",)), networks_of(("10.0.0.0/8",)), "1.2.3.4", NOW)
    assert (refusal.code, refusal.error.status) == ("ip_not_allowed", 403)


def test_model_refusal_names_the_model():
    refusal = governor().admit("a", 1, ClientPolicy(models=("gpt-4o*",)), "o3", b"", None, NOW)
    assert (refusal.code, refusal.error.status) == ("model_not_allowed", 403)
    assert "'o3'" in refusal.error.message


@pytest.mark.parametrize(
    "path, policy, refused",
    [
        ("/v1/realtime/client_secrets", ClientPolicy(models=("gpt-realtime-mini",)), True),
        ("/v1/realtime/sessions", ClientPolicy(daily_tokens=1000), True),
        ("/v1/realtime/transcription_sessions/", ClientPolicy(rpm=5), True),
        ("/openai/v1/realtime/client_secrets?api-version=2025-08-28", ClientPolicy(rpm=5), True),
        ("/openai/realtimeapi/sessions?api-version=2025-04-01-preview", ClientPolicy(rpm=5), True),
        ("/v1/realtime/client_secrets", ClientPolicy(), False),  # a client without limits may (nothing to escape)
        ("/v1/realtime?model=gpt-realtime-mini", ClientPolicy(rpm=5), False),  # through the gateway: counted
        ("/v1/chat/completions", ClientPolicy(rpm=5), False),
    ],
)
def test_a_limited_client_gets_no_ephemeral_key_that_would_reach_upstream_outside_its_limits(path, policy, refused):
    outcome = governor().admit("a", 1, policy, "gpt-realtime-mini", b"{}", None, NOW, path=path)
    if refused:
        assert (outcome.code, outcome.error.status) == ("ephemeral_key_not_allowed", 403)
        assert outcome.error.all_headers()["x-should-retry"] == "false"
    else:
        assert not isinstance(outcome, Refusal)  # admitted (a ticket when the client has counted limits)


@pytest.mark.parametrize(
    "seconds, text", [(0.02, "20ms"), (1.5, "1.5s"), (59.9991, "60s"), (360, "6m0s"), (61.2, "1m2s")]
)
def test_reset_durations_read_like_openais(seconds, text):
    assert duration(seconds) == text


def test_a_client_without_limits_still_has_its_spend_counted():
    g = governor()
    ticket = g.admit("a", 1, ClientPolicy(), "gpt-4o", b"{}", None, NOW)
    assert isinstance(ticket, Ticket)
    assert not ticket.parallel and ticket.tokens_entry is None and ticket.reservations == ()  # nothing held
    g.settle("a", {"total_tokens": 30}, 0.25, NOW + 1)
    names = spend_names(1, NOW)
    assert [g.counters.period_total(names[k]) for k in ("day_tokens", "month_tokens", "day_usd", "month_usd")] == [
        30,
        30,
        0.25,
        0.25,
    ]
    assert g.tickets == {}


def test_none_clears_a_limit():
    assert policy_with(ClientPolicy(rpm=5), {"rpm": "none", "tpm": "9"}) == ClientPolicy(tpm=9)


# ---------------------------------------------------------------------------- budget reservations

CHAT = "/v1/chat/completions"


def chat_body(max_tokens: int | None = 300) -> bytes:
    limit = f', "max_tokens": {max_tokens}' if max_tokens is not None else ""
    return f'{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "hi"}}]{limit}}}'.encode()


@pytest.mark.parametrize(
    "path, model, body, expected",
    [
        (CHAT, "gpt-4o-mini", chat_body(300), (len(chat_body(300)) // 4, 300)),
        (CHAT, "gpt-4o-mini", b'{"max_completion_tokens": 77}', (7, 77)),
        ("/v1/responses", "o3", b'{"max_output_tokens":  9}', (6, 9)),
        (CHAT, "gpt-4o-mini", chat_body(None), (len(chat_body(None)) // 4, 16_384)),  # the model's own limit
        (CHAT, "gpt-5-mini", b"{}", (0, 128_000)),
        (CHAT, "llama-3-70b", b"{}", (0, 16_384)),  # a model keyrotor does not know: the default
        ("/v1/completions?x=1", "gpt-3.5-turbo-instruct", b"{}", (0, 4_096)),
        ("/v1/embeddings", "text-embedding-3-small", b'{"input": "' + b"x" * 400 + b'"}', (103, 0)),  # input only
        ("/v1/realtime?model=gpt-realtime", "gpt-realtime", b"", (0, 0)),  # charged per response instead
        ("/v1/files", None, b"--boundary\r\n" + b"x" * 10_000, (0, 0)),  # an upload generates nothing
    ],
)
def test_what_a_request_reserves(path, model, body, expected):
    assert reservation(path, model, body) == expected


def test_output_allowance_takes_the_first_limit_the_body_names():
    assert output_allowance("gpt-4o", b'{"max_tokens": 12, "max_completion_tokens": 99}') == 12
    assert output_allowance(None, b"{}") == 16_384


def test_a_budget_with_requests_in_flight_refuses_what_would_pass_it():
    g, policy = governor(), ClientPolicy(daily_tokens=1000)
    body = chat_body(300)
    need = len(body) // 4 + 300
    admitted = [g.admit(f"f{i}", 1, policy, "gpt-4o-mini", body, None, NOW, path=CHAT) for i in range(4)]
    assert [type(o) for o in admitted] == [Ticket, Ticket, Ticket, Refusal]  # 3 × need fit in 1000, 4 do not
    refusal = admitted[3]
    assert isinstance(refusal, Refusal) and refusal.code == "insufficient_quota" and refusal.error.status == 429
    assert f"0 tokens spent and {3 * need:g} tokens held by its requests in flight" in refusal.error.message
    assert refusal.error.headers["x-should-retry"] == "false"
    g.settle("f0", {"total_tokens": 20}, None, NOW)  # it used far less than it held
    assert isinstance(g.admit("f3", 1, policy, "gpt-4o-mini", body, None, NOW, path=CHAT), Ticket)
    assert g.reserved[g.spend_names(1, NOW)["day_tokens"]] == 3 * need
    assert isinstance(g.admit("other client", 2, policy, "gpt-4o-mini", body, None, NOW, path=CHAT), Ticket)


def test_a_request_alone_is_admitted_while_the_budget_is_not_spent_and_holds_it_while_it_runs():
    g, policy = governor(), ClientPolicy(daily_tokens=1000)
    big = chat_body(None)  # reserves gpt-4o-mini's 16,384: more than the whole budget
    assert isinstance(g.admit("big", 1, policy, "gpt-4o-mini", big, None, NOW, path=CHAT), Ticket)
    small = chat_body(5)
    assert isinstance(g.admit("small", 1, policy, "gpt-4o-mini", small, None, NOW, path=CHAT), Refusal)
    g.settle("big", None, None, NOW)  # failed or abandoned without a count: its reservation goes all the same
    assert g.reserved == {}
    assert isinstance(g.admit("small", 1, policy, "gpt-4o-mini", small, None, NOW, path=CHAT), Ticket)


def test_parallel_requests_overrun_a_budget_by_at_most_one_request():
    g, policy = governor(), ClientPolicy(daily_tokens=500, monthly_tokens=100_000)
    body = chat_body(60)
    need = len(body) // 4 + 60
    admitted = [
        f"f{i}" for i in range(40) if isinstance(g.admit(f"f{i}", 1, policy, "m", body, None, NOW, path=CHAT), Ticket)
    ]
    assert len(admitted) == 500 // need
    for flow_id in admitted:
        g.settle(flow_id, {"total_tokens": need}, None, NOW)  # each used all it could
    spent = g.counters.period_total(g.spend_names(1, NOW)["day_tokens"])
    assert spent <= 500 and g.reserved == {}
    assert isinstance(g.admit("next", 1, policy, "m", body, None, NOW, path=CHAT), Ticket)  # nothing in flight: unspent
    g.settle("next", {"total_tokens": need}, None, NOW)
    assert g.counters.period_total(g.spend_names(1, NOW)["day_tokens"]) <= 500 + need  # one request's worth over


def test_a_cost_budget_reserves_the_priced_estimate():
    g = governor()
    g.prices = PriceTable({"gpt-4o": Price(input=2.5, output=10.0)})
    policy = ClientPolicy(daily_usd=0.01)
    body = chat_body(300)
    cost = (len(body) // 4 * 2.5 + 300 * 10.0) / 1e6  # about $0.003
    assert isinstance(g.admit("a", 1, policy, "gpt-4o", body, None, NOW, path=CHAT), Ticket)
    assert g.reserved[g.spend_names(1, NOW)["day_usd"]] == pytest.approx(cost)
    assert "tokens" not in " ".join(g.reserved)  # no token budget: nothing held in tokens
    assert [type(g.admit(f"b{i}", 1, policy, "gpt-4o", body, None, NOW, path=CHAT)) for i in range(3)] == [
        Ticket,
        Ticket,
        Refusal,
    ]
    g.settle("a", {"prompt_tokens": 10, "completion_tokens": 10}, 0.0001, NOW)
    assert g.counters.period_total(g.spend_names(1, NOW)["day_usd"]) == pytest.approx(0.0001)
    assert g.reserved[g.spend_names(1, NOW)["day_usd"]] == pytest.approx(2 * cost)


def test_a_model_without_a_price_reserves_no_cost():
    g = governor()
    assert isinstance(
        g.admit("a", 1, ClientPolicy(daily_usd=0.01), "unpriced", chat_body(), None, NOW, path=CHAT), Ticket
    )
    assert g.reserved == {}


def test_realtime_responses_are_charged_without_a_ticket():
    g, policy = governor(), ClientPolicy(daily_tokens=100)
    g.charge(1, {"input_tokens": 40, "output_tokens": 30, "total_tokens": 70}, None, NOW)
    assert g.over_budget(1, policy, NOW) is None
    g.charge(1, {"total_tokens": 30}, 0.002, NOW)
    refusal = g.over_budget(1, policy, NOW)
    assert refusal is not None and refusal.code == "insufficient_quota"
    assert "daily token budget of 100 tokens is spent (100 tokens)" in refusal.error.message
    assert g.counters.period_total(g.spend_names(1, NOW)["month_usd"]) == pytest.approx(0.002)


def batch_line(model: object, custom_id: str = "r") -> str:
    body = {"messages": [{"role": "user", "content": "hi"}]} if model is None else {"model": model}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


MINI, FULL = batch_line("gpt-4o-mini"), batch_line("gpt-4o")


@pytest.mark.parametrize(
    "patterns, text, refused",
    [
        (("gpt-4o-mini",), f"{MINI}\n{MINI}\n", None),
        (("gpt-4o-mini",), f"{MINI}\n{FULL}\n{MINI}\n", "model_not_allowed|line 2 |'gpt-4o'"),
        (("gpt-4o*",), f"{MINI}\n{FULL}", None),  # a wildcard allows both
        ((), f"{FULL}\nnot json\n", None),  # no allowlist: upstream validates the file
        (("gpt-4o-mini",), f"{MINI}\nnot json\n", "invalid_model|Line 2 "),
        (("gpt-4o-mini",), f"{MINI}\n{MINI}\n{batch_line(None)}\n", "invalid_model|Line 3 "),
        (("gpt-4o-mini",), f"{batch_line(4)}\n", "invalid_model|Line 1 "),  # not a string
        (("gpt-4o-mini",), f"{batch_line('')}\n", "invalid_model|Line 1 "),
        (("gpt-4o-mini",), f"{MINI}\r\n{MINI}\r\n", None),  # CRLF line breaks
        (("gpt-4o-mini",), f"{MINI}\r\n{FULL}\r\n", "model_not_allowed|line 2 |'gpt-4o'"),
        (("gpt-4o-mini",), f"\ufeff{MINI}\n\n{MINI}\n\n", None),  # a byte order mark, blank lines
        (("gpt-4o-mini",), "", None),  # nothing to run
        (("gpt-4o-mini",), "[1, 2]\n", "invalid_model|Line 1 "),
        # decoys: a nested or duplicated model, a second body, a body spelled otherwise
        (("gpt-4o-mini",), '{"body": {"model": "gpt-4o", "metadata": {"model": "gpt-4o-mini"}}}', "model_not_allowed"),
        (("gpt-4o-mini",), '{"body": {"model": "gpt-4o-mini", "model": "gpt-4o"}}', "ambiguous_model|Line 1 "),
        (("gpt-4o-mini",), '{"body": {"model": "gpt-4o-mini"}, "body": {"model": "gpt-4o"}}', "invalid_model|Line 1 "),
        (("gpt-4o-mini",), '{"Body": {"model": "gpt-4o"}}', "invalid_model|Line 1 "),
        # U+2028 (a line break to some readers) can only be inside a string: no other line is hidden there
        (
            ("gpt-4o-mini",),
            '{"body": {"model": "gpt-4o-mini"}, "x": "\u2028' + FULL.replace('"', "'") + '"}\n',
            None,
        ),
        # a lone CR: blank to JSON, a line break to some readers (a lenient one would run the gpt-4o it hides)
        (
            ("gpt-4o-mini",),
            '{"body": {"model": "gpt-4o-mini"}, "y":\r{"body": {"model": "gpt-4o"}}}\n',
            "invalid_model|Line 1 |lone CR",
        ),
    ],
)
def test_batch_input_file_lines_name_allowed_models(patterns, text, refused):
    outcome = batch_input_refusal(patterns, text.encode())
    if refused is None:
        assert outcome is None
        return
    assert isinstance(outcome, Refusal)
    code, *says = refused.split("|")
    assert outcome.code == code == outcome.error.code
    assert outcome.error.status == (403 if code == "model_not_allowed" else 400)
    assert outcome.error.headers["x-should-retry"] == "false"
    for part in says:
        assert part in outcome.error.message


def test_a_batch_file_that_is_not_utf8_is_refused_for_an_allowlisted_client():
    outcome = batch_input_refusal(("gpt-4o-mini",), MINI.encode("utf-16"))
    assert outcome is not None and outcome.code == "invalid_model" and "UTF-8" in outcome.error.message


def form(*parts: tuple[str, str, bytes], boundary: str = "XyZ") -> tuple[str, bytes]:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{head}\r\n\r\n'.encode() + value + b"\r\n"
        for name, head, value in parts
    )
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


JSONL = '; filename="in.jsonl"\r\nContent-Type: application/jsonl'
BAD_FILE = f"{MINI}\n{FULL}\n".encode()


@pytest.mark.parametrize(
    "path, parts, refused",
    [
        ("/v1/files", [("purpose", "", b"batch"), ("file", JSONL, BAD_FILE)], "model_not_allowed"),
        ("/v1/files", [("file", JSONL, BAD_FILE), ("purpose", "", b"batch")], "model_not_allowed"),  # any order
        ("/v1/files", [("purpose", "", b"batch"), ("file", JSONL, f"{MINI}\n".encode())], None),
        ("/v1/files", [("purpose", "", b"fine-tune"), ("file", JSONL, BAD_FILE)], None),  # not a batch's input
        ("/v1/files", [("purpose", "", b" Batch "), ("file", JSONL, BAD_FILE)], "model_not_allowed"),
        (
            "/openai/files?api-version=2024-10-21",
            [("purpose", "", b"batch"), ("file", JSONL, BAD_FILE)],
            "model_not_allowed",
        ),
        (
            "/v1/files",
            [("purpose", "", b"batch"), ("file", JSONL + "\r\nContent-Transfer-Encoding: base64", b"e30=")],
            "invalid_model",
        ),
        (
            "/v1/files",
            [("purpose", "", b"batch"), ("file", JSONL + "\r\nContent-Transfer-Encoding: binary", BAD_FILE)],
            "model_not_allowed",
        ),
    ],
)
def test_an_upload_of_a_batch_input_file_is_read_line_by_line(path, parts, refused):
    content_type, body = form(*parts)
    outcome = upload_refusal(("gpt-4o-mini",), path, content_type, body)
    assert (outcome.code if outcome else None) == refused
    assert upload_refusal((), path, content_type, body) is None  # no allowlist: nothing to check


@pytest.mark.parametrize(
    "body, refused",
    [
        (b'{"purpose": "batch", "filename": "in.jsonl", "bytes": 100, "mime_type": "text/jsonl"}', True),
        (b'{"purpose": "fine-tune", "filename": "in.jsonl", "bytes": 100, "mime_type": "text/jsonl"}', False),
        (b'{"purpose": "assistants", "filename": "batch.pdf", "bytes": 100, "mime_type": "application/pdf"}', False),
    ],
)
def test_a_batch_upload_through_the_uploads_api_is_refused_to_an_allowlisted_client(body, refused):
    outcome = upload_refusal(("gpt-4o-mini",), "/v1/uploads", "application/json", body)
    assert (outcome is not None) is refused
    if outcome is not None:
        assert outcome.error.status == 403 and "/v1/files" in outcome.error.message
    assert upload_refusal((), "/v1/uploads", "application/json", body) is None


@pytest.mark.parametrize(
    "method, path, checked",
    [
        ("POST", "/v1/files", True),
        ("POST", "/v1/files/", True),
        ("POST", "/openai/files?api-version=2024-10-21", True),
        ("POST", "/v1/uploads", True),
        ("GET", "/v1/files", False),
        ("POST", "/v1/files/file-1/content", False),
        ("POST", "/v1/uploads/upload_1/parts", False),  # refused when created, if for a batch
        ("POST", "/v1/chat/completions", False),
    ],
)
def test_which_requests_may_upload_a_batch_input_file(method, path, checked):
    assert is_upload(method, path) is checked
