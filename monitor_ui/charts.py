"""Dashboard charts as SVG geometry, computed on the server: no chart library, nothing for CSP to allow.

The plot has no viewBox: x positions are percentages of its width and y positions are pixels,
so bars stretch with the page while text keeps its size (a scaled viewBox shrank the labels to
about 4 px on a phone). The y axis is a separate, fixed-width SVG beside the plot. Each bucket
has a transparent hit area whose data-tip the page's script shows on hover or tap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from storage.rollups import Totals

HEIGHT = 190  # px, the whole chart
PLOT_TOP, PLOT_BOTTOM = 10, 150  # px: the area bars and lines are drawn in
X_LABEL_Y, X_TITLE_Y = 166, 184
TICKS = 4  # about this many gridlines above zero


@dataclass(frozen=True)
class Mark:
    """A rectangle of a bar (x and width in %, y and height in px) or a point of a line (x in %, y in px)."""

    x: float
    y: float
    width: float = 0
    height: float = 0
    css: str = ""


@dataclass(frozen=True)
class Slot:
    """One bucket: its hover/tap area and what it says."""

    x: float
    width: float
    tip: str
    bucket: int = 0  # its start: the page's script finds the same bucket again after a refresh


@dataclass(frozen=True)
class Segment:
    x1: float
    y1: float
    x2: float
    y2: float
    css: str


@dataclass(frozen=True)
class Chart:
    id: str
    caption: str
    y_title: str
    x_title: str
    legend: list[tuple[str, str]]  # (css class of the swatch, text)
    y_ticks: list[tuple[float, str]]  # (y px, label)
    x_ticks: list[tuple[float, str, bool]]  # (x %, label, minor: hidden on narrow screens)
    slots: list[Slot]
    bars: list[Mark] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    points: list[Mark] = field(default_factory=list)
    height: int = HEIGHT
    plot_top: int = PLOT_TOP
    plot_bottom: int = PLOT_BOTTOM
    x_label_y: int = X_LABEL_Y
    x_title_y: int = X_TITLE_Y

    @property
    def summary(self) -> str:
        """What a screen reader hears: the caption and the peak."""
        top = self.y_ticks[-1][1] if self.y_ticks else "0"
        return f"{self.caption}; the scale goes up to {top} {self.y_title}."


def nice_ticks(peak: float, integer: bool = True) -> list[float]:
    """0 and about TICKS round steps (1, 2, 2.5 or 5 times a power of ten) reaching at least `peak`."""
    if peak <= 0:
        return [0.0, 1.0]
    raw = peak / TICKS
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, math.ceil(step))
    count = math.ceil(peak / step - 1e-9)
    return [round(i * step, 6) for i in range(count + 1)]


def count_label(value: float) -> str:
    """1,500 → 1.5k, 2,000,000 → 2M: short enough for a phone's axis."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:g}"


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def ms_label(value: float) -> str:
    return f"{value / 1000:g} s" if value >= 1000 else f"{value:g} ms"


def _y_scale(ticks: list[float]) -> Callable[[float], float]:
    top = ticks[-1] or 1
    return lambda value: round(PLOT_BOTTOM - (PLOT_BOTTOM - PLOT_TOP) * value / top, 2)


def _when(bucket: int, step: int) -> str:
    moment = datetime.fromtimestamp(bucket, UTC)
    if step < 3600:
        return moment.strftime("%H:%M UTC")
    return moment.strftime("%d %b %H:00 UTC") if step < 86400 else moment.strftime("%d %b UTC")


# Gridline spacings, in seconds, from which a chart takes the first that gives at most MAX_X_TICKS labels.
TICK_SPACINGS = (600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 5 * 86400, 7 * 86400, 14 * 86400)
MAX_X_TICKS = 8


def _x_ticks(start: int, step: int, count: int) -> list[tuple[float, str, bool]]:
    """At most about 8 labelled gridlines: every 10 minutes on an hour of minutes, every 3 hours on a day of
    hours (every 6 on a phone), every day on a week, every 5 days on a month."""
    span = step * count
    every = next((e for e in TICK_SPACINGS if e >= step and span / e <= MAX_X_TICKS), TICK_SPACINGS[-1])
    ticks = []
    for index in range(count):
        bucket = start + index * step
        if bucket % every:
            continue
        moment = datetime.fromtimestamp(bucket, UTC)
        if step < 3600:
            label, minor = moment.strftime("%H:%M"), False
        elif every < 86400:
            label = moment.strftime("%d %b") if moment.hour == 0 else moment.strftime("%H:00")
            minor = moment.hour % 6 != 0
        else:
            label, minor = moment.strftime("%d %b"), False
        ticks.append((round((index + 0.5) * 100 / count, 3), label, minor))
    return ticks


@dataclass(frozen=True)
class Layer:
    """One stacked part of a bar chart: its value per bucket, css class and legend text."""

    value: Callable[[Totals], float]
    css: str
    label: str


def bar_chart(
    chart_id: str,
    caption: str,
    y_title: str,
    buckets: Sequence[tuple[int, Totals]],
    start: int,
    step: int,
    count: int,
    layers: Sequence[Layer],
    tip: Callable[[Totals], str],
    tick_label: Callable[[float], str] = count_label,
) -> Chart:
    """`count` slots of `step` seconds from `start`, each a bar of `layers` stacked bottom up."""
    by_bucket = dict(buckets)
    peak = max((sum(layer.value(t) for layer in layers) for t in by_bucket.values()), default=0)
    ticks = nice_ticks(peak, integer=tick_label is count_label)
    y = _y_scale(ticks)
    width = 100 / count
    slots, bars = [], []
    for index in range(count):
        bucket = start + index * step
        totals = by_bucket.get(bucket)
        x = round(index * width, 3)
        slots.append(
            Slot(x, round(width, 3), f"{_when(bucket, step)}: {tip(totals) if totals else 'no requests'}", bucket)
        )
        if totals is None:
            continue
        base = 0.0
        for layer in layers:
            value = layer.value(totals)
            if value <= 0:
                continue
            top, bottom = y(base + value), y(base)
            bars.append(Mark(round(x + width * 0.1, 3), top, round(width * 0.8, 3), round(bottom - top, 2), layer.css))
            base += value
    return Chart(
        id=chart_id,
        caption=caption,
        y_title=y_title,
        x_title="time (UTC)",
        legend=[(layer.css, layer.label) for layer in layers],
        y_ticks=[(y(t), tick_label(t)) for t in ticks],
        x_ticks=_x_ticks(start, step, count),
        slots=slots,
        bars=bars,
    )


def requests_chart(chart_id: str, caption: str, buckets, start: int, step: int, count: int) -> Chart:
    """Requests per bucket: successes solid, errors hatched on top, so they differ without colour."""
    layers = (
        Layer(lambda t: t.requests - t.errors, "ok", "succeeded"),
        Layer(lambda t: t.errors, "err", "errors (hatched)"),
    )

    def tip(t: Totals) -> str:
        return f"{plural(t.requests, 'request')}, {plural(t.errors, 'error')}"

    return bar_chart(chart_id, caption, "requests", buckets, start, step, count, layers, tip)


def usd_label(value: float) -> str:
    return f"${value:,.2f}" if value < 1000 else f"${count_label(value)}"


def spend_chart(chart_id: str, caption: str, buckets, start: int, step: int, count: int) -> Chart:
    """Estimated cost per bucket (a day, on the dashboard's 30 days)."""
    layers = (Layer(lambda t: t.cost, "ok", "estimated cost"),)

    def tip(t: Totals) -> str:
        return f"${t.cost:,.4f}, {plural(t.requests, 'request')}"

    return bar_chart(chart_id, caption, "USD", buckets, start, step, count, layers, tip, usd_label)


def tokens_chart(chart_id: str, caption: str, buckets, start: int, step: int, count: int) -> Chart:
    layers = (
        Layer(lambda t: t.prompt_tokens, "ok", "prompt"),
        Layer(lambda t: t.completion_tokens, "alt", "completion (hatched)"),
    )

    def tip(t: Totals) -> str:
        return f"{t.prompt_tokens:,} prompt + {t.completion_tokens:,} completion tokens"

    return bar_chart(chart_id, caption, "tokens", buckets, start, step, count, layers, tip)


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else value


def latency_chart(chart_id: str, caption: str, buckets, start: int, step: int, count: int) -> Chart:
    """p50 as a solid line with round points, p95 dashed with square points; a gap where no requests came."""
    by_bucket = dict(buckets)
    lines = (("p50", 50, "p50"), ("p95", 95, "p95"))
    values = {bucket: {name: _finite(t.latency_ms(pct)) for name, pct, _ in lines} for bucket, t in by_bucket.items()}
    peak = max((v for per in values.values() for v in per.values() if v is not None), default=0)
    ticks = nice_ticks(peak)
    y = _y_scale(ticks)
    width = 100 / count
    slots, segments, points = [], [], []
    previous: dict[str, tuple[float, float] | None] = {name: None for name, _, _ in lines}
    for index in range(count):
        bucket = start + index * step
        x = round(index * width, 3)
        centre = round(x + width / 2, 3)
        per = values.get(bucket)
        if per is None:
            slots.append(Slot(x, round(width, 3), f"{_when(bucket, step)}: no requests", bucket))
            previous = dict.fromkeys(previous)
            continue
        shown = ", ".join(f"{name} {ms_label(v) if v is not None else 'over 120 s'}" for name, v in per.items())
        requests = plural(by_bucket[bucket].requests, "request")
        slots.append(Slot(x, round(width, 3), f"{_when(bucket, step)}: {shown} ({requests})", bucket))
        for name, _, _ in lines:
            value = per[name]
            if value is None:
                previous[name] = None
                continue
            point = (centre, y(value))
            if previous[name] is not None:
                segments.append(Segment(*previous[name], *point, name))
            points.append(Mark(point[0], point[1], css=name))
            previous[name] = point
    return Chart(
        id=chart_id,
        caption=caption,
        y_title="latency",
        x_title="time (UTC)",
        legend=[("p50", "p50 (solid, round)"), ("p95", "p95 (dashed, square)")],
        y_ticks=[(y(t), ms_label(t)) for t in ticks],
        x_ticks=_x_ticks(start, step, count),
        slots=slots,
        segments=segments,
        points=points,
    )
