"""Bar charts as SVG geometry, computed on the server: no chart library, nothing for CSP to allow."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

WIDTH, HEIGHT, AXIS = 600, 140, 14


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    requests_y: float
    requests_height: float
    errors_y: float
    errors_height: float
    title: str


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    peak: int
    first_label: str
    last_label: str
    width: int = WIDTH
    height: int = HEIGHT + AXIS


def bar_chart(series: list[tuple[int, int, int]], start: int, step: int, count: int, label_format: str) -> Chart:
    """`count` slots of `step` seconds from `start`; missing buckets are empty slots."""
    by_bucket = {bucket: (requests, errors) for bucket, requests, errors in series}
    peak = max((r for r, _ in by_bucket.values()), default=0)
    slot = WIDTH / count
    bars = []
    for index in range(count):
        bucket = start + index * step
        requests, errors = by_bucket.get(bucket, (0, 0))
        if not requests:
            continue
        scale = HEIGHT / peak
        when = datetime.fromtimestamp(bucket, UTC).strftime(label_format)
        bars.append(
            Bar(
                x=round(index * slot, 2),
                width=round(max(slot - 1, 1), 2),
                requests_y=round(HEIGHT - requests * scale, 2),
                requests_height=round(requests * scale, 2),
                errors_y=round(HEIGHT - errors * scale, 2),
                errors_height=round(errors * scale, 2),
                title=f"{when} UTC: {requests} requests, {errors} errors",
            )
        )
    label = lambda t: datetime.fromtimestamp(t, UTC).strftime(label_format)  # noqa: E731
    return Chart(bars, peak, label(start), label(start + (count - 1) * step))
