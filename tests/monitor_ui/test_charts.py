"""Chart geometry: round ticks, bars inside the plot, a value for every bucket, gaps in lines."""

from __future__ import annotations

import pytest

from monitor_ui import charts
from storage.rollups import HISTOGRAM_SIZE, Totals, bucket_index

START = 1_800_000_000  # a whole hour


def totals(requests: int, errors: int = 0, ms: float = 100, prompt: int = 0, completion: int = 0) -> Totals:
    latency = [0] * HISTOGRAM_SIZE
    latency[bucket_index(ms)] = requests
    return Totals(requests, errors, 0, prompt, completion, 0.0, ms * requests, latency, [0] * HISTOGRAM_SIZE)


@pytest.mark.parametrize(
    "peak, ticks",
    [
        (0, [0, 1]),
        (1, [0, 1]),
        (3, [0, 1, 2, 3]),
        (7, [0, 2, 4, 6, 8]),
        (10, [0, 2.5, 5, 7.5, 10]),
        (12, [0, 5, 10, 15]),
        (95, [0, 25, 50, 75, 100]),
        (1500, [0, 500, 1000, 1500]),
    ],
)
def test_ticks_are_round_and_reach_the_peak(peak, ticks):
    found = charts.nice_ticks(peak, integer=False) if peak == 10 else charts.nice_ticks(peak)
    assert found == ticks


@pytest.mark.parametrize("value, label", [(0, "0"), (999, "999"), (1500, "1.5k"), (2_000_000, "2M")])
def test_count_labels_stay_short(value, label):
    assert charts.count_label(value) == label


def test_request_bars_stack_errors_on_successes_within_the_plot():
    chart = charts.requests_chart("m", "Requests", [(START + 120, totals(8, errors=2))], START, 60, 60)
    assert [(b.css, b.height) for b in chart.bars] == [("ok", pytest.approx(105)), ("err", pytest.approx(35))]
    ok, err = chart.bars
    assert err.y + err.height == pytest.approx(ok.y) and ok.y + ok.height == charts.PLOT_BOTTOM
    assert err.y == charts.PLOT_TOP  # the peak is the top tick, 8
    assert [label for _, label in chart.y_ticks] == ["0", "2", "4", "6", "8"]
    assert len(chart.slots) == 60 and chart.slots[2].tip == "08:02 UTC: 8 requests, 2 errors"
    assert chart.slots[3].tip == "08:03 UTC: no requests"
    assert [label for _, label, _ in chart.x_ticks] == ["08:00", "08:10", "08:20", "08:30", "08:40", "08:50"]
    assert chart.legend == [("ok", "succeeded"), ("err", "errors (hatched)")]


def test_hour_ticks_show_the_date_at_midnight_and_fewer_labels_on_a_phone():
    midnight = 1_800_230_400  # 2027-01-18 00:00 UTC
    chart = charts.requests_chart("h", "Requests", [], midnight - 3 * 3600, 3600, 24)
    assert [(label, minor) for _, label, minor in chart.x_ticks][:3] == [
        ("21:00", True),
        ("18 Jan", False),
        ("03:00", True),
    ]


def test_latency_lines_break_where_no_requests_came_and_p95_is_its_own_shape():
    buckets = [(START, totals(4, ms=90)), (START + 60, totals(4, ms=180)), (START + 180, totals(2, ms=40))]
    chart = charts.latency_chart("l", "Latency", buckets, START, 60, 60)
    assert [s.css for s in chart.segments] == ["p50", "p95"]  # minutes 0-1 joined; minute 3 stands alone
    assert len(chart.points) == 6
    assert chart.slots[1].tip == "08:01 UTC: p50 200 ms, p95 200 ms (4 requests)"
    assert chart.y_ticks[-1][1] == "200 ms"


def test_token_bars_and_tips():
    chart = charts.tokens_chart("t", "Tokens", [(START, totals(1, prompt=1200, completion=300))], START, 60, 60)
    assert [b.css for b in chart.bars] == ["ok", "alt"]
    assert chart.slots[0].tip == "08:00 UTC: 1,200 prompt + 300 completion tokens"
    assert chart.y_ticks[-1][1] == "1.5k"
