"""Routing by model, fallbacks, reading the model, renaming it, and addressing each dialect."""

from __future__ import annotations

import random

import pytest

from core.dialects import models_url, upstream_url, url_parts, with_key
from core.routing import Candidate, Dialect, Group, RouteTable, Upstream, ordered, renamed_model, requested_model

OPENAI = Upstream(1, "openai", "https://api.openai.com")
RELAY = Upstream(2, "relay", "https://relay.example/v1")
AZURE = Upstream(3, "azure", "https://res.openai.azure.com", Dialect.AZURE, "2025-01-01-preview")
DEFAULT = Upstream(4, "default", None)


def group(id_: int, upstream: Upstream, name: str, priority: int = 0, weight: float = 1.0, **models) -> Group:
    return Group(id_, upstream, name, priority, weight, True, {k.replace("_", "-"): v for k, v in models.items()})


ALL = group(1, DEFAULT, "default")  # lists no models: serves every model
CHEAP = group(2, RELAY, "cheap", priority=10, gpt_4o_mini=None, gpt_4o="gpt-4o-2024-11-20")
PREMIUM = group(3, OPENAI, "premium", priority=5, gpt_4o=None, o1=None)
AZURE_PROD = group(4, AZURE, "prod", priority=10, gpt_4o="prod-gpt4o")


@pytest.mark.parametrize(
    "groups, model, expected",
    [
        ([ALL], "anything", ["default/default"]),
        ([CHEAP, PREMIUM], "o1", ["openai/premium"]),
        ([CHEAP, PREMIUM], "gpt-4o-mini", ["relay/cheap"]),
        ([CHEAP, PREMIUM], "gpt-4o", ["relay/cheap", "openai/premium"]),  # priority 10 before 5
        ([CHEAP, PREMIUM], "unknown", []),
        ([CHEAP, PREMIUM, ALL], "unknown", ["default/default"]),
        ([PREMIUM, ALL], "o1", ["openai/premium"]),  # a catch-all serves only what no group lists
        ([PREMIUM, ALL], "gpt-4o-mini", ["default/default"]),
        ([CHEAP, ALL, PREMIUM], "gpt-4o", ["relay/cheap", "openai/premium"]),
    ],
)
def test_a_model_goes_to_the_groups_that_serve_it_highest_priority_first(groups, model, expected):
    assert [c.group.label for c in RouteTable(groups).candidates(model)] == expected


@pytest.mark.parametrize(
    "fallbacks, expected",
    [
        ({}, [("openai/premium", "o1")]),
        ({"o1": ["gpt-4o-mini"]}, [("openai/premium", "o1"), ("relay/cheap", "gpt-4o-mini")]),
        # A fallback no group lists is the catch-all's: the admin routed it there by naming it.
        ({"o1": ["o1-mini"]}, [("openai/premium", "o1"), ("default/default", "o1-mini")]),
        (
            {"o1": ["o1-mini", "gpt-4o"]},
            [
                ("openai/premium", "o1"),
                ("default/default", "o1-mini"),
                ("relay/cheap", "gpt-4o"),
                ("openai/premium", "gpt-4o"),
            ],
        ),
    ],
)
def test_a_catch_all_serves_a_listed_model_only_as_a_fallback_named_for_it(fallbacks, expected):
    table = RouteTable([CHEAP, PREMIUM, ALL], fallbacks)
    assert [(c.group.label, c.model) for c in table.candidates("o1")] == expected


def test_a_model_only_disabled_groups_list_goes_to_no_catch_all():
    off = Group(5, RELAY, "off", 99, 1.0, False, {"claude-3": None})
    gone = group(6, Upstream(9, "gone", "http://x", enabled=False), "g", 99, llama=None)
    table = RouteTable([off, gone, ALL, PREMIUM])
    assert table.candidates("claude-3") == table.candidates("llama") == []
    assert table.is_listed("claude-3") and not table.is_listed("unknown") and not table.is_listed(None)
    assert [c.group.label for c in table.candidates("unknown")] == ["default/default"]
    assert not RouteTable([off, ALL]).trivial  # the one-group shortcut would not read the model


def test_aliases_name_the_model_upstream_uses():
    (relay, premium) = RouteTable([CHEAP, PREMIUM]).candidates("gpt-4o")
    assert (relay.model, relay.upstream_model, relay.renames) == ("gpt-4o", "gpt-4o-2024-11-20", True)
    assert (premium.upstream_model, premium.renames) == ("gpt-4o", False)


def test_fallback_models_come_after_every_group_of_the_model():
    table = RouteTable([CHEAP, PREMIUM], {"o1": ["gpt-4o", "gpt-4o-mini"]})
    found = [(c.group.label, c.model, c.fallback_from) for c in table.candidates("o1")]
    assert found == [
        ("openai/premium", "o1", None),
        ("relay/cheap", "gpt-4o", "o1"),
        ("openai/premium", "gpt-4o", "o1"),
        ("relay/cheap", "gpt-4o-mini", "o1"),
    ]


def test_disabled_groups_and_upstreams_serve_nothing():
    off = Group(5, OPENAI, "off", 99, 1.0, False, {"o1": None})
    gone = group(6, Upstream(9, "gone", "http://x", enabled=False), "g", 99, o1=None)
    assert [c.group.label for c in RouteTable([off, gone, PREMIUM]).candidates("o1")] == ["openai/premium"]


def test_requests_without_a_model_go_to_the_default_group():
    assert RouteTable([CHEAP, ALL, PREMIUM]).candidates(None) == [Candidate(ALL, None, None)]
    # Without default/default: the highest priority group.
    assert RouteTable([PREMIUM, CHEAP]).candidates(None)[0].group is CHEAP


def test_the_one_catch_all_group_of_a_fresh_install_is_trivial():
    assert RouteTable([ALL]).trivial and not RouteTable([ALL], {"a": ["b"]}).trivial
    assert not RouteTable([ALL, PREMIUM]).trivial and not RouteTable([PREMIUM]).trivial


def test_weights_share_a_priority_and_every_group_appears_once():
    a, b = group(7, OPENAI, "a", weight=3.0), group(8, OPENAI, "b", weight=1.0)
    rng = random.Random(1)
    firsts = [ordered([a, b], rng)[0].name for _ in range(4000)]
    assert 0.7 < firsts.count("a") / len(firsts) < 0.8
    assert sorted(g.name for g in ordered([a, b], rng)) == ["a", "b"]


@pytest.mark.parametrize(
    "content_type, body, model",
    [
        ("application/json", b'{"model": "gpt-4o", "messages": []}', "gpt-4o"),
        ("application/json", b'{"messages": [{"content": "\\"model\\": \\"x\\""}]}', None),
        ("application/json", b'{"model": 5}', None),
        ("application/json", b"not json", None),
        ("application/json", b"", None),
        (
            "multipart/form-data; boundary=XyZ",
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\x00\x01\r\n'
            b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--XyZ--\r\n',
            "whisper-1",
        ),
        ("multipart/form-data; boundary=XyZ", b"--XyZ\r\n\r\n--XyZ--", None),
    ],
)
def test_the_model_is_read_from_json_or_the_form(content_type, body, model):
    assert requested_model(content_type, body) == model


@pytest.mark.parametrize(
    "body, old, new, expected",
    [
        (b'{"model":"gpt-4o","x":1}', "gpt-4o", "prod", b'{"model":"prod","x":1}'),
        (b'{"model" : "gpt-4o"}', "gpt-4o", "a\\b", b'{"model" : "a\\\\b"}'),
        (b'{"content":"\\"model\\":\\"gpt-4o\\""}', "gpt-4o", "prod", b'{"content":"\\"model\\":\\"gpt-4o\\""}'),
        (
            b'data: {"model":"up"}\n\ndata: {"model":"up"}\n\n',
            "up",
            "mine",
            b'data: {"model":"mine"}\n\ndata: {"model":"mine"}\n\n',
        ),
        (b'{"model":"gpt-4o-mini"}', "gpt-4o", "prod", b'{"model":"gpt-4o-mini"}'),
    ],
)
def test_renaming_touches_only_the_model_pair(body, old, new, expected):
    assert renamed_model(body, old, new) == expected


def test_renaming_once_leaves_later_pairs():
    assert (
        renamed_model(b'{"model":"a","tools":[{"model":"a"}]}', "a", "b", count=1)
        == b'{"model":"b","tools":[{"model":"a"}]}'
    )


@pytest.mark.parametrize(
    "candidate, path, url",
    [
        (Candidate(ALL, "gpt-4o", "gpt-4o"), "/v1/chat/completions", "http://default:1/v1/chat/completions"),
        (
            Candidate(CHEAP, "gpt-4o", "gpt-4o-2024-11-20"),
            "/v1/chat/completions?x=1",
            "https://relay.example/v1/chat/completions?x=1",
        ),
        (Candidate(PREMIUM, "o1", "o1"), "/v1/embeddings", "https://api.openai.com/v1/embeddings"),
        (
            Candidate(AZURE_PROD, "gpt-4o", "prod-gpt4o"),
            "/v1/chat/completions",
            "https://res.openai.azure.com/openai/deployments/prod-gpt4o/chat/completions?api-version=2025-01-01-preview",
        ),
        (
            Candidate(AZURE_PROD, "gpt-4o", "prod-gpt4o"),
            "/v1/audio/transcriptions?api-version=1999-01-01&foo=bar",
            "https://res.openai.azure.com/openai/deployments/prod-gpt4o/audio/transcriptions?api-version=2025-01-01-preview&foo=bar",
        ),
        (
            Candidate(AZURE_PROD, None, None),
            "/v1/files",
            "https://res.openai.azure.com/openai/files?api-version=2025-01-01-preview",
        ),
    ],
)
def test_each_dialect_has_its_url(candidate, path, url):
    assert upstream_url(candidate, path, "http://default:1") == url


@pytest.mark.parametrize(
    "url, parts",
    [
        ("https://relay.example/v1/chat?x=1", (b"https", "relay.example", 443, "relay.example", b"/v1/chat?x=1")),
        ("http://127.0.0.1:8000/v1/models", (b"http", "127.0.0.1", 8000, "127.0.0.1:8000", b"/v1/models")),
        ("http://relay.example", (b"http", "relay.example", 80, "relay.example", b"/")),
    ],
)
def test_a_requests_address_is_set_from_the_url_as_its_data_holds_it(url, parts):
    assert url_parts(url) == parts


def test_each_group_names_the_dialect_its_key_is_put_in():
    table = RouteTable([CHEAP, AZURE_PROD])
    assert table.dialect_of(AZURE_PROD.id) == Dialect.AZURE and table.dialect_of(CHEAP.id) == Dialect.OPENAI
    assert table.dialect_of(99) == table.dialect_of(None) == Dialect.OPENAI  # a deleted group, or none


def test_azure_takes_the_key_in_api_key_and_never_sees_authorization():
    fields = ((b"Authorization", b"Bearer [client key #1]"), (b"content-type", b"application/json"))
    assert with_key(Dialect.AZURE, fields, "az-key") == (
        (b"content-type", b"application/json"),
        (b"api-key", b"az-key"),
    )
    assert with_key(Dialect.OPENAI, fields, "sk-x")[0] == (b"Authorization", b"Bearer sk-x")


@pytest.mark.parametrize(
    "dialect, base, url",
    [
        (Dialect.OPENAI, "https://api.openai.com", "https://api.openai.com/v1/models"),
        (Dialect.OPENAI, "https://relay.example/v1", "https://relay.example/v1/models"),
        (
            Dialect.AZURE,
            "https://res.openai.azure.com",
            "https://res.openai.azure.com/openai/models?api-version=2024-10-21",
        ),
    ],
)
def test_models_are_listed_where_each_dialect_lists_them(dialect, base, url):
    assert models_url(dialect, base, None) == url
