"""The typed things keyrotor reasons about: key states, pooled keys, clients."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from core.limits import NO_LIMITS, ClientPolicy, Network, networks_of


class KeyState(StrEnum):
    """Where an upstream key stands in its pool (see DESIGN.md's table of states)."""

    ACTIVE = "active"
    COOLING = "cooling"  # rate limited or circuit open, until cooldown_until
    EXHAUSTED = "exhausted"  # out of quota until re-validated or reset
    INVALID = "invalid"  # refused (401/403) until re-validated or reset
    DISABLED = "disabled"  # an admin's decision, which outranks upstream


# Keys an admin may put back to active with `keys reset`.
RESETTABLE = (KeyState.INVALID, KeyState.EXHAUSTED, KeyState.COOLING)
# Keys that re-validation probes by default: refused ones that may have come back.
REFUSED = (KeyState.INVALID, KeyState.EXHAUSTED)


@dataclass
class PoolKey:
    """One upstream key as the proxy holds it in memory, its value in clear."""

    id: int
    value: str
    last4: str
    state: KeyState
    state_reason: str | None
    cooldown_until: float | None
    weight: float
    requests: int
    state_changed_at: float | None = None
    group_id: int | None = None  # the upstream group whose pool it is in


@dataclass(frozen=True)
class Client:
    """Whoever holds a client key that keyrotor issued: a person, team or service, and its limits."""

    id: int
    name: str
    policy: ClientPolicy = NO_LIMITS
    networks: tuple[Network, ...] = field(default=(), compare=False)  # policy.ips parsed, once per reload
    legacy_objects: bool = False  # may reach objects that belong to no client (made before tenancy, or elsewhere)

    def __post_init__(self) -> None:
        if self.policy.ips and not self.networks:
            object.__setattr__(self, "networks", networks_of(self.policy.ips))


@dataclass
class AddReport:
    """What adding keys in bulk did: never the values, only ids, counts and line numbers."""

    added: list[int] = field(default_factory=list)
    duplicates: int = 0
    malformed: list[int] = field(default_factory=list)  # 1-based line numbers


@dataclass(frozen=True)
class KeyStateChange:
    """A state the proxy learnt from upstream about one key, to persist."""

    key_id: int
    state: KeyState
    reason: str | None
    cooldown_until: float | None
    at: float


@dataclass(frozen=True)
class FetchedModels:
    """What a group's upstream listed as its models, to store in place of the last list it gave."""

    group_id: int
    models: tuple[str, ...]
