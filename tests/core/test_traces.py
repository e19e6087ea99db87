"""core/traces.py: the trace's request, what an answer names, the verdict, the per-address limit."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from core import traces


def test_the_image_is_a_valid_png():
    png = traces.IMAGE
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 200
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (16, 16)
    offset = 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind, data = png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", png[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + data) & 0xFFFFFFFF
        offset += 12 + length
    assert kind == b"IEND"


def test_trace_ids_are_fresh_and_url_safe():
    made = {traces.new_trace_id() for _ in range(200)}
    assert len(made) == 200 and all(len(i) == 32 and traces.valid_trace_id(i) for i in made)


@pytest.mark.parametrize("text", ["", "a" * 65, "../x", "a b", "é", "x%00", "a;b", "'"])
def test_what_cannot_be_a_trace_id_is_refused_before_any_lookup(text):
    assert not traces.valid_trace_id(text)


def test_the_request_names_the_image_at_the_public_url():
    url = traces.image_url("https://trace.example.com/", "abc_-1")
    assert url == "https://trace.example.com/api/img?traceid=abc_-1"
    body = json.loads(traces.request_body("gpt-4o", url))
    assert body["model"] == "gpt-4o"
    assert body["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (
            200,
            {"model": "gpt-4o-mini", "system_fingerprint": "fp_1", "choices": [{"message": {"content": "A red box"}}]},
            traces.Answer(200, "gpt-4o-mini", "fp_1", "A red box", None),
        ),
        (200, {"choices": []}, traces.Answer(200)),
        (401, {"error": {"message": "bad key"}}, traces.Answer(401, error="bad key")),
        (502, "not json", traces.Answer(502, error="not json")),
        (200, {"model": ["x"], "system_fingerprint": 7, "choices": "no"}, traces.Answer(200, None, "7")),
    ],
)
def test_an_answer_s_model_fingerprint_and_text(status, body, expected):
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    assert traces.read_answer(status, raw) == expected


@pytest.mark.parametrize(
    "text, mentions",
    [
        ("The image shows a red square.", True),
        ("A small RED tile.", True),
        ("I cannot see images.", False),  # "images" is not "image": plural refusals say no
        ("Hello from the fake upstream.", False),
        ("Imagery of a pixelated thing", False),
        ("It's a picture.", True),
    ],
)
def test_mentions_the_image_is_a_word_heuristic(text, mentions):
    assert traces.mentions_image(text) is mentions


def fetch(address: str, agent: str, delay: float | None = 0.5) -> dict:
    return {"address": address, "user_agent": agent, "delay_seconds": delay}


def test_the_verdict_counts_distinct_addresses_and_their_agents():
    found = traces.verdict(
        "gpt-4o",
        True,
        [fetch("1.1.1.1", "A", 2.0), fetch("1.1.1.1", "B", 1.0), fetch("2.2.2.2", "A", None)],
        "a red square",
        "gpt-4o-2024-08-06",
        "fp",
    )
    assert found.state == "fetched" and found.summary == "fetched by 2 distinct addresses"
    assert found.fetchers == (
        traces.Fetcher("1.1.1.1", ("A", "B"), 2, 1.0),
        traces.Fetcher("2.2.2.2", ("A",), 1, None),
    )
    assert found.mentions_image is True and found.model_differs is False  # a dated version: the same model


@pytest.mark.parametrize(
    "asked, named, same",
    [
        ("gpt-4o", "gpt-4o", True),
        ("gpt-4o", "GPT-4o-2024-08-06", True),
        ("gpt-4", "gpt-4-0613", True),
        ("gpt-4o", "gpt-4o-mini", False),
        ("gpt-4o", "gpt-4o-mini-2024-07-18", False),
        ("gpt-4o", "gpt-4o-audio-preview", False),
        ("gpt-4.1", "gpt-4x1", False),
    ],
)
def test_a_dated_snapshot_is_the_same_model_and_a_cheaper_one_is_not(asked, named, same):
    assert traces.verdict(asked, True, [], "", named, None).model_differs is not same


def test_no_fetch_only_once_finished_and_a_swapped_model_shows():
    assert traces.verdict("gpt-4o", False, [], None, None, None).state == "pending"
    found = traces.verdict("gpt-4o", True, [], "hello", "gpt-4o-mini", None)
    assert (found.state, found.summary, found.model_differs) == ("no fetch", "no fetch", True)
    assert traces.verdict("gpt-4o", False, [fetch("1.1.1.1", "A")], None, None, None).summary.endswith("(so far)")


def test_headers_are_kept_bounded():
    kept = traces.bounded_headers([("x-long", "v" * 5000)] + [(f"h{i}", "x" * 500) for i in range(40)])
    assert kept[0] == ("x-long", "v" * traces.MAX_HEADER_VALUE)
    assert kept[-1] == ("x-keyrotor-note", "more headers not kept")
    assert sum(len(n) + len(v) for n, v in kept[:-1]) <= traces.MAX_HEADER_BYTES


def test_each_address_has_its_own_minute():
    limiter = traces.AddressLimiter(per_minute=3)
    assert [limiter.allow("a", 100.0 + i) for i in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 103.0)
    assert limiter.allow("a", 160.5)  # the first has left the minute


def test_the_limiter_stays_bounded_under_a_spray_of_addresses():
    limiter = traces.AddressLimiter(per_minute=1, max_addresses=100)
    for i in range(1000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter._seen) <= 101
