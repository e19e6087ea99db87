"""What is wrong now: the alert conditions, decided from plain figures (monitor_ui/alerting.py reads them).

Each condition has a stable key; an alert is raised when its key first appears and cleared
when it is gone (storage/alerts.py), so each one is sent once per time it holds. The webhook
body is Slack's `{"text": ...}` with the same facts as fields for any other receiver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BUDGET = "budget"
KEY_STATE = "key_state"
GROUP_UNUSABLE = "group_unusable"
ERROR_RATE = "error_rate"
TEST = "test"
BAD_KEY_STATES = ("invalid", "exhausted")
# A client's budgets, as the policy names them: (policy field, counter kind, what it counts).
BUDGETS = (
    ("daily_usd", "day_usd", "USD today"),
    ("monthly_usd", "month_usd", "USD this month"),
    ("daily_tokens", "day_tokens", "tokens today"),
    ("monthly_tokens", "month_tokens", "tokens this month"),
)


@dataclass(frozen=True)
class Condition:
    key: str
    kind: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientBudget:
    client_id: int
    name: str
    budget: str  # daily_usd, monthly_usd, daily_tokens, monthly_tokens
    limit: float
    spent: float


def budget_conditions(budgets: list[ClientBudget], thresholds: tuple[int, ...]) -> list[Condition]:
    """The highest threshold (percent of the budget) each client's budget has reached."""
    found = []
    for b in budgets:
        if b.limit <= 0:
            continue
        percent = 100 * b.spent / b.limit
        reached = [t for t in sorted(thresholds) if percent >= t]
        if not reached:
            continue
        threshold = reached[-1]
        what = next(text for name, _, text in BUDGETS if name == b.budget)
        spent = f"{b.spent:,.2f}" if b.budget.endswith("usd") else f"{b.spent:,.0f}"
        limit = f"{b.limit:,.2f}" if b.budget.endswith("usd") else f"{b.limit:,.0f}"
        found.append(
            Condition(
                f"{BUDGET}:client={b.client_id}:{b.budget}:{threshold}",
                BUDGET,
                f"Client {b.name} has used {percent:.0f} % of its {b.budget} budget ({spent} of {limit} {what}).",
                {
                    "client_id": b.client_id,
                    "client": b.name,
                    "budget": b.budget,
                    "threshold_percent": threshold,
                    "percent": round(percent, 1),
                    "spent": b.spent,
                    "limit": b.limit,
                },
            )
        )
    return found


def key_conditions(keys: list[tuple[int, str, str, str | None]]) -> list[Condition]:
    """Keys (id, label, state, reason) that upstream said are invalid or out of quota."""
    return [
        Condition(
            f"{KEY_STATE}:key={key_id}:{state}",
            KEY_STATE,
            f"Upstream key {label} is {state}" + (f": {reason}" if reason else "."),
            {"key_id": key_id, "key": label, "state": state, "reason": reason},
        )
        for key_id, label, state, reason in keys
        if state in BAD_KEY_STATES
    ]


def group_conditions(groups: list[tuple[int, str, int, int]]) -> list[Condition]:
    """Serving groups (id, label, keys, usable keys) left with no usable key: keys, none active or cooling.

    A group that never had a key (a fresh install's default group, when every key is elsewhere) is left out.
    """
    return [
        Condition(
            f"{GROUP_UNUSABLE}:group={group_id}",
            GROUP_UNUSABLE,
            f"Group {label} has no usable key ({keys} key{'' if keys == 1 else 's'}, none active or cooling):"
            " its requests fail over to other groups or are refused.",
            {"group_id": group_id, "group": label, "keys": keys, "usable_keys": usable},
        )
        for group_id, label, keys, usable in groups
        if keys > 0 and usable == 0
    ]


def error_rate_condition(
    requests: int, errors: int, threshold_percent: float, min_requests: int, window_minutes: int
) -> list[Condition]:
    """Errors above `threshold_percent` of at least `min_requests` requests in the last `window_minutes`."""
    if threshold_percent <= 0 or requests < max(1, min_requests):
        return []
    rate = 100 * errors / requests
    if rate < threshold_percent:
        return []
    return [
        Condition(
            f"{ERROR_RATE}:above={threshold_percent:g}",
            ERROR_RATE,
            f"{rate:.0f} % of requests failed in the last {window_minutes} minutes ({errors:,} of {requests:,});"
            f" the threshold is {threshold_percent:g} %.",
            {
                "error_rate_percent": round(rate, 1),
                "errors": errors,
                "requests": requests,
                "threshold_percent": threshold_percent,
                "window_minutes": window_minutes,
            },
        )
    ]


def webhook_body(alert: dict[str, Any], ui_url: str | None = None) -> dict[str, Any]:
    """The JSON a webhook receives: Slack reads `text`; the rest is the same alert, field by field."""
    state = "cleared" if alert.get("cleared_at") else "raised"
    text = f"keyrotor alert: {alert['message']}"
    if ui_url:
        text += f" <{ui_url}/dashboard#alerts|dashboard>"
    return {
        "text": text,
        "keyrotor": {
            "id": alert.get("id"),
            "kind": alert["kind"],
            "condition": alert["condition"],
            "state": state,
            "message": alert["message"],
            "details": alert.get("details") or {},
            "raised_at": alert.get("raised_at"),
        },
    }
