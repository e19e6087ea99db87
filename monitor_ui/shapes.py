"""What the JSON API answers, one model per shape: the routes' `response_model`, so /api/openapi.json shows them.

The handlers build plain dicts (the pages render the same ones); these models describe them and must not
change them. So numbers whose type storage decides (a sum, a time, a REAL column) are `Number`, which keeps
an integer an integer and a float a float, and every model keeps a key it does not declare
(tests/monitor_ui/test_openapi.py checks that none turns up undeclared).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

Number = int | float
Pair = tuple[Number, Number | None, Number | None]  # a chart's point: bucket start and two figures


class Shape(BaseModel):
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------- upstreams, groups, models


class GroupSummary(Shape):
    id: int
    label: str  # UPSTREAM/GROUP
    upstream: str
    name: str
    priority: Number
    weight: Number
    enabled: bool
    upstream_enabled: bool
    serving: bool  # enabled, and its upstream too: what the proxy does with it
    dialect: str
    keys: int
    usable_keys: int  # active, or cooling past the end of their rest: what the proxy may pick now
    cannot_serve: str | None  # why it cannot serve now for want of a key (no keys, none usable); None: it can
    models: int
    every_model: bool  # an empty model list serves every model
    models_refreshed_at: Number | None
    created_at: Number


class GroupList(Shape):
    groups: list[GroupSummary]


class Upstream(Shape):
    id: int
    name: str
    base_url: str | None  # None: the proxy's own upstream (proxy.upstream)
    dialect: str
    api_version: str | None
    enabled: bool
    groups: int
    keys: int
    created_at: Number
    group_list: list[GroupSummary]


class UpstreamList(Shape):
    upstreams: list[Upstream]


class UpstreamDeleted(Shape):
    name: str
    deleted: bool
    groups: int
    keys: int  # how many keys went with it


class Key(Shape):
    """An upstream key, masked: its value never leaves the database."""

    id: int
    name: str | None
    key: str  # …abcd
    label: str
    state: str
    state_reason: str | None
    cooldown_until: Number | None
    cooldown_over: bool
    weight: Number
    group_id: int | None
    group: str | None
    requests: Number | None
    prompt_tokens: Number | None
    completion_tokens: Number | None
    cost: Number | None
    last_used_at: Number | None
    created_at: Number
    objects: int  # files, batches, stored responses... only this key can reach


class GroupModel(Shape):
    model: str
    upstream_model: str | None
    source: str  # fetched, or added by hand


class GroupDetail(GroupSummary):
    base_url: str | None
    api_version: str | None
    model_list: list[GroupModel]
    key_list: list[Key]
    next_after: int | None
    by_state: dict[str, int]


class GroupDeleted(Shape):
    id: int
    label: str
    deleted: bool
    keys: int


class ModelsRefreshed(Shape):
    group: str
    added: int
    removed: int
    listed: int
    error: str | None


class ServingGroup(Shape):
    id: int
    label: str
    upstream_model: str
    source: str
    priority: Number
    serving: bool
    usable_keys: int
    cannot_serve: str | None


class CatchAllGroup(Shape):
    id: int
    label: str
    priority: Number
    serving: bool
    usable_keys: int
    cannot_serve: str | None


class ServedModel(Shape):
    model: str
    groups: list[ServingGroup]
    fallbacks: list[str]
    usable_keys: int  # in the serving groups that route it (a model no group lists: the catch-all groups')
    cannot_serve: str | None  # set when none of them has a usable key now (its fallbacks may still answer)


class ModelsOverview(Shape):
    models: list[ServedModel]
    every_model_groups: list[CatchAllGroup]


class FallbacksOf(Shape):
    model: str
    fallbacks: list[str]


# --------------------------------------------------------------------------- upstream keys


class KeyPage(Shape):
    keys: list[Key]
    next_after: int | None  # the next page's `after`
    by_state: dict[str, int]


class KeysAdded(Shape):
    added: list[int]  # ids
    duplicates: int
    malformed_lines: list[int]  # 1-based


class KeyWeight(Shape):
    id: int
    weight: Number


class KeyChanged(Shape):
    id: int
    done: str
    owned_objects: int | None = None  # only when it owns objects no other key can reach
    warning: str | None = None


class KeysReset(Shape):
    reset: int


class KeyValidation(Shape):
    id: int
    last4: str
    result: str
    reason: str | None
    state: str  # afterwards


class Validations(Shape):
    results: list[KeyValidation]
    skipped: list[int]


# --------------------------------------------------------------------------- clients


class ClientSpend(Shape):
    day_tokens: Number
    day_usd: Number
    month_tokens: Number
    month_usd: Number


class Budget(Shape):
    kind: str
    label: str
    limit: Number
    spent: Number
    percent: int


class Client(Shape):
    id: int
    name: str
    key: str | None  # …abcd of its first key
    keys: int
    enabled: bool
    legacy_objects: bool  # may reach objects no client made (`run.py clients set NAME --legacy-objects`)
    requests: Number | None
    prompt_tokens: Number | None
    completion_tokens: Number | None
    cost: Number | None
    last_used_at: Number | None
    created_at: Number
    limits: dict[str, Any]  # the limits that are set, as `run.py clients` names them
    spend: ClientSpend
    budgets: list[Budget]


class ClientList(Shape):
    clients: list[Client]


class ClientKey(Shape):
    id: int
    key: str
    state: str  # active, disabled or revoked
    requests: Number | None
    cost: Number | None
    last_used_at: Number | None
    created_at: Number
    revoked_at: Number | None


class RecentFlow(Shape):
    id: int
    flow_id: str
    started_at: Number
    method: str
    path: str
    status: int | None
    model: str | None
    total_tokens: Number | None
    cost: Number | None
    refusal: str | None
    error: str | None


class ClientObject(Shape):
    id: str
    kind: str
    owner_key_id: int
    flow_id: str | None  # the flow that made it
    created_at: Number
    client_id: int


class ClientDetail(Client):
    keys: list[ClientKey]  # type: ignore[assignment]  # the list, where Client counts them
    recent_flows: list[RecentFlow]
    objects: list[ClientObject]  # the newest objects it made: only it can reach them


class ClientCreated(Shape):
    name: str
    key: str  # shown this once


class ClientKeyCreated(Shape):
    id: int
    key: str  # shown this once


class Done(Shape):
    id: int
    done: str


# --------------------------------------------------------------------------- dashboard


class Figures(Shape):
    requests: int
    errors: int
    success_rate: Number | None
    latency_p50_ms: Number | None
    latency_p95_ms: Number | None
    first_byte_p50_ms: Number | None
    streamed: int
    prompt_tokens: Number
    completion_tokens: Number
    cost: Number


class _Named(Shape):
    name: str


class _Valued(Shape):
    id: int | str | None  # the model, or the id of a key, client, upstream or group


class Window(Figures, _Named):
    """One window's figures (name first)."""


class BreakdownRow(Figures, _Valued):
    label: str | None = None  # keys, clients, upstreams and groups
    deleted: bool | None = None  # upstreams and groups


class CaptureHealth(Shape):
    failing: bool
    failing_since: Number | None
    error: str | None
    waiting: int
    dropped: int
    last_drop_at: Number | None
    last_drop_reason: str | None


class RedisHealthShape(Shape):
    """Redis as the UI and the nodes see it; absent without [redis] url (docs/redis.md)."""

    up: bool
    error: str | None
    errors: int
    nodes_down: int
    down_since: Number | None


class TimeRangeShape(Shape):
    name: str  # 1h, 24h, 7d, 30d or custom
    label: str
    since: Number
    until: Number
    grain: str  # minute, hour or day: the buckets of the range's series
    step_seconds: int


class SpendRow(Shape):
    id: int | str | None  # a client's, key's or group's id, or a model's name; None: flows without one
    label: str | int | None
    total: Number
    days: list[Number]  # USD per day, the same days as SpendPerDay.days


class SpendPerDay(Shape):
    days: list[int]  # the start of each UTC day, oldest first (30 days, today last)
    total: list[Number]  # USD per day, every flow
    by: dict[str, list[SpendRow]]  # client, key, model, group: the 10 that cost most


class Alert(Shape):
    id: int
    condition: str
    kind: str
    message: str
    details: dict[str, Any]
    raised_at: Number
    cleared_at: Number | None
    sent_at: Number | None
    send_error: str | None


class Dashboard(Shape):
    generated_at: Number
    range: TimeRangeShape
    series: list[tuple[Number, int, int]]  # the range's buckets: start, requests, errors
    latency_series: list[Pair]
    tokens_series: list[tuple[Number, Number, Number]]
    cost_series: list[tuple[Number, Number]]
    spend_per_day: SpendPerDay
    alerts: list[Alert]  # open now
    windows: list[Window]
    per_minute: list[tuple[Number, int, int]]  # bucket start, requests, errors
    per_hour: list[tuple[Number, int, int]]
    latency_per_minute: list[Pair]  # bucket start, p50, p95 (ms)
    tokens_per_minute: list[tuple[Number, Number, Number]]  # bucket start, prompt, completion
    breakdowns: dict[str, list[BreakdownRow]]  # by model, upstream_id, group_id, upstream_key_id, client_key_id
    keys_by_state: dict[str, int]
    refusals: dict[str, int]  # last 24 hours, by reason
    capture: CaptureHealth
    redis: RedisHealthShape | None = None


# --------------------------------------------------------------------------- flows and audit


class FlowSummary(Shape):
    id: int
    flow_id: str
    started_at: str  # ISO 8601, UTC
    duration_ms: Number | None
    method: str
    path: str
    status: int | None
    model: str | None
    stream: bool
    client_key_id: int | None
    upstream_key_id: int | None
    attempts: int | None
    total_tokens: Number | None
    error: str | None
    upstream_id: int | None
    group_id: int | None
    fallback_model: str | None
    client_id: int | None
    refusal: str | None
    tags: str | None  # x-keyrotor-tags, comma-separated
    session: str | None  # x-keyrotor-session
    prompt_preview: str | None  # the prompt's last user message, cut short (none for flows before previews)
    answer_preview: str | None
    cost: Number | None
    first_byte_ms: Number | None
    upstream_key: str | None
    client: str | None
    upstream: str | None
    group: str | None


class FlowPage(Shape):
    flows: list[FlowSummary]
    next_before: int | None  # the next page's `before`
    partial: bool  # a phrase was checked on the newest candidates only: older flows may match too


class SseEvent(Shape):
    offset_ms: Number | None
    type: str | None
    data: str


class WebSocketMessage(Shape):
    offset_ms: Number | None
    direction: str
    kind: str
    size: int | None
    type: str | None
    data: str | None


class FlowObject(Shape):
    id: str
    role: str
    kind: str | None
    owner_key_id: int | None
    client_id: int | None  # the client that made it (None: no client, made before or elsewhere)
    client_name: str | None


class RequestChange(Shape):
    where: str  # line, header or body
    name: str
    client: str | None  # as the client sent it (None: it did not)
    sent: str | None  # as keyrotor sent it upstream (None: it did not)
    kind: str  # added, removed, changed


class FlowLink(Shape):
    id: int
    status: int | None
    started_at: str | None


class FlowDetail(Shape):
    id: int
    flow_id: str
    started_at: str | None
    first_byte_at: str | None
    ended_at: str | None
    duration_ms: Number | None
    method: str
    path: str
    status: int | None
    model: str | None
    stream: bool
    client_key_id: int | None
    upstream_key_id: int | None
    attempts: int | None
    prompt_tokens: Number | None
    completion_tokens: Number | None
    total_tokens: Number | None
    cost: Number | None
    client_addr: str | None
    error: str | None
    request_headers: list[Any]  # [name, value] pairs, secrets redacted
    response_headers: list[Any]
    request_body: str | None
    request_body_size: int | None
    request_body_truncated: int | None
    response_body: str | None
    response_body_size: int | None
    response_body_truncated: int | None
    chunk_times: list[Any]  # [ms after the first byte, bytes] per read
    upstream_id: int | None
    group_id: int | None
    fallback_model: str | None
    cached_tokens: Number | None
    reasoning_tokens: Number | None
    request_body_type: str | None
    response_body_type: str | None
    websocket_messages: list[WebSocketMessage] | None
    client_id: int | None
    refusal: str | None
    tags: str | None
    session: str | None
    prompt_preview: str | None
    answer_preview: str | None
    streamed_text: str | None
    request_body_kept_bytes: int | None
    request_body_download: str | None  # where a body kept as bytes downloads from
    response_body_kept_bytes: int | None
    response_body_download: str | None
    time_to_first_byte_ms: Number | None
    attempt_list: list[dict[str, Any]]
    upstream_key: str | None
    client: str | None
    upstream: str | None
    group: str | None
    group_exists: bool
    events: list[SseEvent]
    curl: str
    objects: list[FlowObject]
    replay_of: int | None  # the flow this one sent again (docs/workbench.md)
    pin_note: str | None  # where the admin pinned it, and what became of that
    client_request: dict[str, Any] | None  # how the client's request differed from the one sent upstream
    request_diff: list[RequestChange]
    replays: list[FlowLink]  # flows that sent this one again
    worker: int | None  # which proxy worker served it (docs/workers.md); None: one process


class AuditEntry(Shape):
    at: Number
    actor: str
    address: str | None
    action: str
    target: str | None
    changes: dict[str, Any]


class AuditEntries(Shape):
    entries: list[AuditEntry]


# --------------------------------------------------------------------------- workbench: replay and compare


class Replayed(Shape):
    id: int | None  # the new flow (None: not recorded within 30 s; look for flow_id)
    flow_id: str | None  # mitmproxy's id of the new flow
    status: int  # what the proxy answered the replay with
    replay_of: int


class CompareSide(Shape):
    id: int
    method: str
    path: str
    stream: bool
    replay_of: int | None
    status: int | None
    model: str | None
    fallback_model: str | None
    duration_ms: Number | None
    time_to_first_byte_ms: Number | None
    prompt_tokens: Number | None
    completion_tokens: Number | None
    total_tokens: Number | None
    cost: Number | None
    group_id: int | None
    upstream_key_id: int | None
    client_id: int | None
    error: str | None


class CompareFact(Shape):
    name: str
    a: Any
    b: Any
    same: bool


class WordRun(Shape):
    op: str  # same, removed (only in a), added (only in b)
    text: str


class CompareText(Shape):
    a: str | None  # the assistant's text (a stream's reassembled)
    b: str | None
    identical: bool
    similarity: Number  # share of characters in common, 0..1
    diff: list[WordRun]


class HeaderChange(Shape):
    name: str
    a: str | None
    b: str | None


class JsonBodyChange(Shape):
    path: str
    kind: str  # added, removed, changed
    a: Any
    b: Any


class Comparison(Shape):
    a: CompareSide
    b: CompareSide
    facts: list[CompareFact]
    text: CompareText
    headers: dict[str, list[HeaderChange]]  # request, response
    bodies: dict[str, list[JsonBodyChange]]  # request (as the clients sent them), response (whole answers)


class ReplayJobRow(Shape):
    original: int
    replay: int | None
    status_a: int | None
    status_b: int | None
    ms_a: Number | None
    ms_b: Number | None
    tokens_a: Number | None
    tokens_b: Number | None
    text: str  # identical, different, none
    error: str | None


class ReplayJobSummary(Shape):
    status_changed: int
    text_different: int
    text_identical: int
    errors: int


class ReplayJob(Shape):
    id: str
    state: str  # running, finished
    total: int
    done: int
    group: str | None
    model: str | None
    concurrency: int
    created_at: str | None
    summary: ReplayJobSummary
    rows: list[ReplayJobRow]
