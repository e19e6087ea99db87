"""Capture: every flow becomes one record; event streams are teed as they pass."""

from __future__ import annotations

import json
import sqlite3

import pytest
from mitmproxy import exceptions
from mitmproxy import flow as mitm_flow
from mitmproxy.connection import ConnectionState
from mitmproxy.test import taddons, tflow, tutils

from addons.capture import CUT, Capture
from addons.runtime import Runtime
from config import ROOT
from core.records import StreamTee
from storage import writer
from tests.conftest import addon_context, wait_for
from tests.fakes import MemoryWriter


@pytest.fixture
def capture(database):
    runtime = Runtime()
    addon = Capture(records=runtime.writer)
    with addon_context(addon, database, runtime) as tctx:
        # mitmdump configures every option at start; the flows here are dated long ago, so no age limit
        tctx.configure(addon, capture_prices=str(ROOT / "prices.toml"), capture_keep_days=0)
        addon.running()
        yield addon, database
        addon.done()


def captured(path, columns: str) -> list[tuple]:
    """`columns` of every flow in the database at `path`, in the order they were written."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT {columns} FROM flows ORDER BY id").fetchall()
    finally:
        conn.close()


def test_only_event_streams_are_teed(capture):
    addon, _ = capture
    sse = tflow.tflow(resp=tutils.tresp(headers=((b"content-type", b"text/event-stream; charset=utf-8"),)))
    plain = tflow.tflow(resp=True)
    addon.responseheaders(sse)
    addon.responseheaders(plain)
    assert isinstance(sse.response.stream, StreamTee)
    assert not plain.response.stream


def test_a_flow_reporting_response_and_error_is_one_row(capture):
    addon, path = capture
    flow = tflow.tflow(resp=True)
    addon.response(flow)
    flow.error = tflow.terr()
    addon.error(flow)
    failed = tflow.tflow(err=True)
    addon.error(failed)

    rows = wait_for(lambda: len(r := captured(path, "flow_id, status, error")) == 2 and r, what="two rows")
    assert rows[0][:2] == (flow.id, 200)
    # No response: the client got mitmproxy's 502, and the row says so.
    assert rows[1][0] == failed.id and rows[1][1] == 502 and rows[1][2] == "error"


def chat_flow(model: str, usage: dict) -> tflow.HTTPFlow:
    return tflow.tflow(
        req=tutils.treq(method=b"POST", path=b"/v1/chat/completions", content=json.dumps({"model": model}).encode()),
        resp=tutils.tresp(
            headers=((b"content-type", b"application/json"),), content=json.dumps({"usage": usage}).encode()
        ),
    )


def test_captured_chat_flows_are_priced_from_the_prices_file(capture):
    addon, path = capture
    usage = {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500}
    addon.response(chat_flow("gpt-4o-2024-08-06", usage))
    addon.response(chat_flow("some-local-model", usage))

    priced, unknown = wait_for(
        lambda: len(r := captured(path, "model, total_tokens, cost")) == 2 and r, what="two rows"
    )
    assert priced[:2] == ("gpt-4o-2024-08-06", 1500) and priced[2] == pytest.approx(0.006)  # $2.50 and $10 per 1M
    assert unknown == ("some-local-model", 1500, None)


def test_a_prices_file_of_ones_own_is_used(tmp_path, database):
    prices = tmp_path / "mine.toml"
    prices.write_text('["house-model"]\ninput = 1\noutput = 2\n')
    runtime = Runtime()
    addon = Capture(records=runtime.writer)
    with addon_context(addon, database, runtime) as tctx:
        tctx.configure(addon, capture_prices=str(prices))
        assert addon.snapshot(chat_flow("house-model", {})).prices.cost("house-model", 10**6, 10**6) == 3.0


@pytest.mark.parametrize(
    "content, words",
    [(None, ["does not exist"]), ('["gpt-4o"]\ninput = 2.5\n', ['model "gpt-4o"', 'lacks "output"'])],
)
def test_a_missing_or_malformed_prices_file_is_refused(tmp_path, database, content, words):
    prices = tmp_path / "prices.toml"
    if content is not None:
        prices.write_text(content)
    runtime = Runtime()
    addon = Capture(records=runtime.writer)
    with addon_context(addon, database, runtime) as tctx:
        with pytest.raises(exceptions.OptionsError) as raised:
            tctx.configure(addon, capture_prices=str(prices))
    message = str(raised.value)
    assert "capture_prices" in message and str(prices) in message and all(w in message for w in words), message


@pytest.mark.parametrize(
    "options, retention, refused, refusal",
    [
        (
            {"capture_keep_days": 7, "capture_max_rows": 5000},
            {"keep_days": 7, "max_rows": 5000, "max_bytes": 0},
            {"capture_max_rows": -1},
            "capture.max_rows must be a whole number, zero or more",
        ),
        (
            {"capture_max_gb": "1.5"},
            {"max_bytes": 1_500_000_000},  # GB, decimals allowed, reach the writer as bytes
            {"capture_max_gb": "-1"},
            "capture.max_gb must be a number, zero or more",
        ),
    ],
    ids=["keep_days-max_rows", "max_gb"],
)
def test_retention_options_reach_the_writer(database, options, retention, refused, refusal):
    runtime = Runtime()
    addon = Capture(records=runtime.writer)
    with addon_context(addon, database, runtime) as tctx:
        addon.running()
        try:
            tctx.configure(addon, **options)
            assert {name: getattr(addon._writer.retention, name) for name in retention} == retention
            with pytest.raises(exceptions.OptionsError, match=refusal):
                tctx.configure(addon, **refused)
        finally:
            addon.done()


def test_a_websocket_session_is_one_row_when_it_ends_with_its_messages(capture):
    addon, path = capture
    session = tflow.twebsocketflow()  # a 101 answer and four messages, two each way
    addon.requestheaders(session)
    addon.response(session)  # the upgrade: the session has only begun
    plain = tflow.tflow(resp=True)
    addon.response(plain)

    def stored():
        return captured(path, "flow_id, status, websocket_messages, error")

    wait_for(lambda: len(stored()) == 1, what="the plain flow's row")
    assert stored()[0][0] == plain.id  # nothing yet for the session
    session.websocket.close_code = 1006  # the connection dropped without a close frame
    addon.websocket_end(session)
    rows = wait_for(lambda: len(r := stored()) == 2 and r, what="the session's row")
    flow_id, status, messages, error = rows[1]
    assert (flow_id, status) == (session.id, 101)
    directions = [(m[1], m[2]) for m in json.loads(messages)]
    expected = [
        ("client" if m.from_client else "server", "text" if m.is_text else "binary") for m in session.websocket.messages
    ]
    assert directions == expected and len(directions) >= 2
    assert error == "WebSocket closed with code 1006"


def test_over_in_memory_ports_a_flow_goes_to_the_runtimes_writer_while_the_proxy_runs():
    sink = MemoryWriter()
    addon = Capture(records=sink)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, capture_prices=str(ROOT / "prices.toml"), capture_keep_days=3, capture_max_rows=10)
        early = tflow.tflow(resp=True)
        addon.response(early)  # before running: nothing to write to yet
        addon.running()
        assert sink.retention == writer.Retention(keep_days=3, max_rows=10)
        flow = tflow.tflow(resp=True)
        addon.requestheaders(flow)
        addon.response(flow)
        unfinished = tflow.tflow()
        addon.requestheaders(unfinished)
        addon.done()  # the proxy stops: the unfinished flow is recorded too, then the runtime stops the writer
    assert [r.flow_id for r in sink.records] == [flow.id, unfinished.id]
    assert sink.records[1].error.startswith("keyrotor stopped before the request finished")


@pytest.mark.parametrize(
    ("left", "answered", "upstream_error", "status", "cut"),
    [
        (False, True, None, 200, False),  # the client is there: it gets the answer
        (True, True, None, None, True),  # it left while the key pool retried: a retry's 200 reached nobody
        (True, False, "upstream timed out", None, True),  # nor mitmproxy's 502
        (True, False, "Client disconnected.", None, False),  # mitmproxy's own word for it, as before
    ],
)
def test_a_client_that_left_before_any_answer_is_recorded_as_cut(left, answered, upstream_error, status, cut):
    sink = MemoryWriter()
    addon = Capture(records=sink)
    with taddons.context(addon):
        addon.running()
        flow = tflow.tflow(resp=answered)
        flow.client_conn.state = ConnectionState.CAN_WRITE if left else ConnectionState.OPEN  # CAN_WRITE: EOF read
        if upstream_error:
            flow.error = mitm_flow.Error(upstream_error)
            addon.error(flow)
        else:
            addon.response(flow)
    (record,) = sink.records
    assert record.status == status
    assert (CUT in (record.error or "")) is cut
    if cut:
        assert record.first_byte_at is None
