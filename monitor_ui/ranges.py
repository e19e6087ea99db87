"""The time-range picker of the dashboard and the flows page: `?range=1h|24h|7d|30d` or `?since=&until=`.

A range is read into the rollup grain its charts use: minutes for up to three hours (while
minute rows are kept), hours for up to eight days, whole days beyond (hour rows summed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from fastapi import HTTPException

from storage import rollups

RANGES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
RANGE_NAMES = {"1h": "last hour", "24h": "last 24 hours", "7d": "last 7 days", "30d": "last 30 days"}
DEFAULT = "24h"
DAY = 86400
MAX_SPAN = 400 * DAY


def range_since(name: str, now: float | None = None) -> float:
    return (time.time() if now is None else now) - RANGES[name]


@dataclass(frozen=True)
class TimeRange:
    """What the charts and breakdowns cover: [since, until), drawn as `count` buckets of `step` seconds."""

    name: str  # 1h, 24h, 7d, 30d, or "custom"
    label: str
    since: float
    until: float
    grain: str  # minute, hour or day
    step: int
    start: int  # the first bucket
    count: int

    @property
    def rollup_grain(self) -> str:
        return "minute" if self.grain == "minute" else "hour"


def time_range(name: str | None, since: float | None, until: float | None, now: float) -> TimeRange:
    """The picker's choice; a custom since/until wins over a named range. A 422 says what is wrong."""
    if since is None and until is None:
        name = name or DEFAULT
        if name not in RANGES:
            raise HTTPException(422, f"range must be one of {', '.join(RANGES)}.")
        since, until, label = now - RANGES[name], now, RANGE_NAMES[name]
    else:
        if since is None:
            raise HTTPException(422, "A custom range needs since (its start); until defaults to now.")
        until = now if until is None else until
        if until <= since:
            raise HTTPException(422, "until must be after since.")
        if until - since > MAX_SPAN:
            raise HTTPException(422, "A custom range spans at most 400 days.")
        name, label = "custom", "custom range"
    span = until - since
    if span <= 3 * 3600 and since >= now - rollups.KEEP_MINUTES_SECONDS:
        grain, step = "minute", 60
    elif span <= 8 * DAY:
        grain, step = "hour", 3600
    else:
        grain, step = "day", DAY
    if name == "custom":
        start = int(since // step) * step
        count = max(1, math.ceil((until - start) / step))
    else:
        # Whole buckets, the current one last: "last hour" is the 60 minutes up to this one's end.
        count = RANGES[name] // step
        start = int(until // step) * step - (count - 1) * step
        since = start
    return TimeRange(name, label, since, until, grain, step, start, count)
