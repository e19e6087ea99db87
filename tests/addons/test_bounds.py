"""Bounds: the checks made at the headers, with mitmproxy's test helpers."""

from __future__ import annotations

import json

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from addons.bounds import Bounds, declared_size


@pytest.mark.parametrize("value, size", [("12", 12), (" 7 ", 7), ("-1", None), ("a lot", None), (None, None)])
def test_declared_size(value, size):
    flow = tflow.tflow()
    if value is None:
        del flow.request.headers["content-length"]
    else:
        flow.request.headers["content-length"] = value
    assert declared_size(flow.request) == size


def test_a_body_announced_too_large_is_answered_at_the_headers():
    bounds = Bounds()
    with taddons.context(bounds) as tctx:
        tctx.configure(bounds, proxy_max_body_bytes=100)
        flow = tflow.tflow()
        flow.request.headers["content-length"] = "101"
        flow.request.headers["expect"] = "100-continue"
        bounds.requestheaders(flow)
        assert flow.response.status_code == 413
        assert json.loads(flow.response.content)["error"]["code"] == "request_too_large"
        assert "expect" not in flow.request.headers  # no "100 Continue": the body is not wanted
        within = tflow.tflow()
        within.request.headers["content-length"] = "100"
        bounds.requestheaders(within)
        assert within.response is None


@pytest.mark.parametrize("name", ["proxy.max_body_bytes", "proxy.header_timeout_seconds"])
def test_limits_must_be_above_zero(name):
    bounds = Bounds()
    option = name.replace(".", "_")
    with taddons.context(bounds) as tctx:
        with pytest.raises(exceptions.OptionsError) as raised:
            tctx.configure(bounds, **{option: 0})
    assert str(raised.value) == f"{name} must be a whole number above zero (got 0 from the mitmproxy option {option})."


def test_the_header_deadline_never_runs_while_an_answer_is_still_being_retried():
    bounds = Bounds()
    with taddons.context(bounds) as tctx:
        tctx.configure(bounds, proxy_header_timeout_seconds=2)
        flow = tflow.tflow(resp=True)
        flow.live = True  # the key pool is retrying in its response hook, after this addon's
        bounds.client_connected(flow.client_conn)
        bounds.requestheaders(flow)
        bounds.response(flow)
        assert bounds.expired(100.0, 2) == []  # 100 s of retries: the client is kept
        assert bounds.expired(200.0, 2) == []
        flow.live = False  # the answer went out at last: the deadline starts now
        assert bounds.expired(201.0, 2) == []
        assert bounds.expired(202.5, 2) == []
        assert bounds.expired(203.5, 2) == [flow.client_conn.id]  # no next request in 2 s


def test_a_connection_that_sends_no_request_is_closed_at_the_deadline():
    bounds = Bounds()
    with taddons.context(bounds):
        flow = tflow.tflow()
        bounds.client_connected(flow.client_conn)
        opened = bounds._waiting[flow.client_conn.id]
        assert bounds.expired(opened + 1, 2) == []
        assert bounds.expired(opened + 2, 2) == [flow.client_conn.id]
