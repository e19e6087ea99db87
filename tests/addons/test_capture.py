"""Capture: snapshot on the loop, row built in the writer; streamed bodies teed."""

from __future__ import annotations

import gzip
import json
import sqlite3

import pytest
from mitmproxy import exceptions
from mitmproxy.test import tflow, tutils

from addons.capture import Capture, CapturedFlow, StreamTee, redact, sse_usage
from config import ROOT
from storage import writer
from storage.prices import Price, PriceTable
from tests.conftest import addon_context, wait_for

SSE = (
    b'data: {"choices":[{"delta":{"content":"Hi"}}],"usage":null}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}\n\n'
    b"data: [DONE]\n\n"
)


def captured(**overrides) -> CapturedFlow:
    fields = dict(
        flow_id="f1", started_at=100.0, method="POST", path="/v1/chat/completions", client_addr="127.0.0.1",
        request_fields=((b"Authorization", b"Bearer kr-secret"), (b"content-type", b"application/json")),
        request_body=b'{"model": "gpt-4o-mini", "messages": []}', request_encoding=None,
        client_key_id=1, upstream_key_id=2, body_mode="full", max_body_bytes=10, status=200,
        first_byte_at=100.5, ended_at=101.0,
        response_fields=((b"content-type", b"application/json"), (b"set-cookie", b"session=abc")),
        response_body=b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}',
    )  # fmt: skip
    return CapturedFlow(**{**fields, **overrides})


def test_row_from_a_plain_response():
    row = captured().to_row()
    assert (row["model"], row["stream"], row["status"], row["duration_ms"]) == ("gpt-4o-mini", 0, 200, 1000.0)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (3, 4, 7)
    assert (row["client_key_id"], row["upstream_key_id"], row["attempts"]) == (1, 2, 1)
    assert json.loads(row["request_headers"]) == [["Authorization", "[redacted]"], ["content-type", "application/json"]]
    assert json.loads(row["response_headers"])[1] == ["set-cookie", "[redacted]"]


def test_row_from_a_streamed_response():
    row = captured(is_sse=True, response_body=None, response_chunks=[SSE[:30], SSE[30:]],
                   chunk_times=[(100.5, 30), (100.75, len(SSE) - 30)]).to_row()  # fmt: skip
    assert row["stream"] == 1 and row["response_body"] == SSE.decode()
    assert (row["prompt_tokens"], row["total_tokens"]) == (9, 11)
    assert json.loads(row["chunk_times"]) == [[0.0, 30], [250.0, len(SSE) - 30]]


def test_compressed_bodies_are_stored_decoded():
    body = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}'
    row = captured(response_body=gzip.compress(body), response_encoding="gzip").to_row()
    assert row["response_body"] == body.decode() and row["total_tokens"] == 2


@pytest.mark.parametrize(
    "mode, stored, truncated",
    [("full", '{"model": "gpt-4o-mini", "messages": []}', 0), ("truncated", '{"model": ', 1), ("none", None, 0)],
)
def test_body_modes(mode, stored, truncated):
    row = captured(body_mode=mode).to_row()
    assert (row["request_body"], row["request_body_truncated"]) == (stored, truncated)
    assert row["request_body_size"] == 40


def test_binary_and_odd_bodies_do_not_break_the_row():
    row = captured(request_body=b"\xff\xfe\x00binary", response_body=b"[1, 2]").to_row()
    assert row["model"] is None and row["total_tokens"] is None and "binary" in row["request_body"]


@pytest.mark.parametrize(
    "model, cost",
    [("gpt-4o-mini", (3 * 0.15 + 4 * 0.60) / 1e6), ("gpt-4o-mini-2024-07-18", (3 * 0.15 + 4 * 0.60) / 1e6),
     ("llama-3-70b", None)],
)  # fmt: skip
def test_cost_of_a_row_from_its_model_and_usage(model, cost):
    prices = PriceTable({"gpt-4o-mini": Price(0.15, 0.60)})
    row = captured(request_body=json.dumps({"model": model}).encode(), prices=prices).to_row()
    assert row["cost"] == (pytest.approx(cost) if cost else None)
    assert row["total_tokens"] == 7  # an unknown model still counts its tokens


def test_rows_without_usage_or_prices_have_no_cost():
    assert captured(response_body=b'{"error": {"code": "rate_limit_exceeded"}}',
                    prices=PriceTable({"gpt-4o-mini": Price(0.15, 0.60)})).to_row()["cost"] is None  # fmt: skip
    assert captured().to_row()["cost"] is None


def test_sse_usage_ignores_chunks_without_usage():
    assert sse_usage(b'data: {"usage": null}\n\ndata: [DONE]\n\n') is None


def test_redact_is_case_insensitive():
    assert redact(((b"API-Key", b"x"), (b"Cookie", b"y"), (b"X-Other", b"z"))) == [
        ["API-Key", "[redacted]"], ["Cookie", "[redacted]"], ["X-Other", "z"],
    ]  # fmt: skip


def test_tee_passes_bytes_through_unchanged():
    tee = StreamTee(first_byte=0.0)
    assert [tee(b"data: 1\n\n"), tee(b"data: 2\n\n"), tee(b"")] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert tee.chunks == [b"data: 1\n\n", b"data: 2\n\n"] and tee.ended_at is not None


@pytest.fixture
def capture(database):
    addon = Capture()
    with addon_context(addon, database) as tctx:
        # mitmdump configures every option at start; the flows here are dated long ago, so no age limit
        tctx.configure(addon, capture_prices=str(ROOT / "prices.toml"), capture_keep_days=0)
        addon.running()
        yield addon, database
        addon.done()


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

    def stored():
        conn = sqlite3.connect(path)
        rows = conn.execute("SELECT flow_id, status, error FROM flows ORDER BY id").fetchall()
        conn.close()
        return len(rows) == 2 and rows

    rows = wait_for(stored, what="two rows")
    assert rows[0][:2] == (flow.id, 200)
    assert rows[1][0] == failed.id and rows[1][1] is None and rows[1][2] == "error"


def chat_flow(model: str, usage: dict) -> tflow.HTTPFlow:
    return tflow.tflow(
        req=tutils.treq(method=b"POST", path=b"/v1/chat/completions", content=json.dumps({"model": model}).encode()),
        resp=tutils.tresp(headers=((b"content-type", b"application/json"),), content=json.dumps({"usage": usage}).encode()),
    )  # fmt: skip


def test_captured_chat_flows_are_priced_from_the_prices_file(capture):
    addon, path = capture
    usage = {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500}
    addon.response(chat_flow("gpt-4o-2024-08-06", usage))
    addon.response(chat_flow("some-local-model", usage))

    def stored():
        conn = sqlite3.connect(path)
        rows = conn.execute("SELECT model, total_tokens, cost FROM flows ORDER BY id").fetchall()
        conn.close()
        return len(rows) == 2 and rows

    priced, unknown = wait_for(stored, what="two rows")
    assert priced[:2] == ("gpt-4o-2024-08-06", 1500) and priced[2] == pytest.approx(0.006)  # $2.50 and $10 per 1M
    assert unknown == ("some-local-model", 1500, None)


def test_a_prices_file_of_ones_own_is_used(tmp_path, database):
    prices = tmp_path / "mine.toml"
    prices.write_text('["house-model"]\ninput = 1\noutput = 2\n')
    addon = Capture()
    with addon_context(addon, database) as tctx:
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
    addon = Capture()
    with addon_context(addon, database) as tctx:
        with pytest.raises(exceptions.OptionsError) as raised:
            tctx.configure(addon, capture_prices=str(prices))
    message = str(raised.value)
    assert "capture_prices" in message and str(prices) in message and all(w in message for w in words), message


def test_retention_options_reach_the_writer(database):
    addon = Capture()
    with addon_context(addon, database) as tctx:
        addon.running()
        try:
            tctx.configure(addon, capture_keep_days=7, capture_max_rows=5000)
            assert addon._writer.retention == writer.Retention(keep_days=7, max_rows=5000)
            with pytest.raises(exceptions.OptionsError, match="capture_max_rows must be zero or more"):
                tctx.configure(addon, capture_max_rows=-1)
        finally:
            addon.done()
