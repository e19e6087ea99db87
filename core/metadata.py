"""What the addons tell each other about a flow, under `flow.metadata["keyrotor.<name>"]`.

Addons never import each other; these types are their whole contract. Nothing here may
hold a key value: mitmweb copies metadata and a saved flow keeps it.

mitmproxy's flow files (`mitmdump -w`, mitmweb's Save) hold only plain values, and a
flow's state is a deep copy of its metadata: so a copy of one of these is a plain dict,
and `of()` reads either form back (a replayed or loaded flow carries the dict).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Self

from core.classify import OutcomeKind
from core.records import AttemptLog

ACCESS = "keyrotor.access"
KEYPOOL = "keyrotor.keypool"
# When the client got the first byte of its answer: a stream's first chunk (addons/upstream_watch.py
# holds a stream's headers until then, and sets 0.0 meanwhile), or a retried answer sent whole.
FIRST_BYTE_AT = "keyrotor.first_byte_at"


def reached_client(metadata: dict[str, Any], streaming: bool) -> bool:
    """Part of the answer is on its way to the client: too late to retry it or to answer otherwise."""
    first_byte = metadata.get(FIRST_BYTE_AT)
    return streaming if first_byte is None else bool(first_byte)  # None: headers were not held


# The one model the request names for upstream (core/request_model.py), read once by the first
# addon that needs it, so the allowlist, routing, prices and the record cannot disagree.
MODEL = "keyrotor.model"
USAGE = "keyrotor.usage"
RECORDED = "keyrotor.capture.recorded"
# True on a GET /v1/models sent upstream (a group serves every model): the groups' own models are
# added to upstream's list once the key pool has its final answer (addons/models.py, models_merge.py).
MERGE_MODELS = "keyrotor.models.merge"
# The object ids a request names (core/affinity.py referenced_ids): scanned once, by the first addon
# that asks (Tenancy, then the key pool), from the body as the client sent it.
REFERENCED = "keyrotor.referenced"


def plain(value: Any) -> Any:
    """`value` with dataclasses as dicts and enums as their values: what a flow file can hold."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value


class Metadata:
    """Typed flow metadata that copies itself as plain values."""

    KEY = ""

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        copied: dict[str, Any] = plain(self)  # a dataclass's plain form is a dict
        return copied

    @classmethod
    def from_plain(cls, values: dict[str, Any]) -> Self:
        return cls(**values)

    @classmethod
    def of(cls, metadata: dict[str, Any]) -> Self | None:
        """This addon's entry in a flow's metadata, turned back into its type if it was copied."""
        value = metadata.get(cls.KEY)
        if isinstance(value, dict):
            value = metadata[cls.KEY] = cls.from_plain(value)
        return value


@dataclass
class AccessVerdict(Metadata):
    """Who is calling: a client, or why the request was refused (then `rejected` is its error code)."""

    client_id: int | None = None
    client_name: str | None = None
    rejected: str | None = None  # missing_api_key, invalid_api_key, key_expired, model_not_allowed, …
    masked: str | None = None  # the refused credential, shortened beyond use
    key_id: int | None = None  # which of the client's keys it used
    reason: str | None = None  # a refusal's "code: message", for the flow's row
    counted: bool = False  # the client has limits: the request holds a share of its counters (core.limits)
    groups: list[str] | None = None  # the UPSTREAM/GROUP labels the client may be served by (None: any)
    # A request the monitor UI sent under the client with a pass (core/passes.py), and where it is pinned.
    by_pass: bool = False
    pinned_group: int | None = None
    pinned_key: int | None = None
    replay_of: int | None = None  # the flow (row id) it sends again
    pin_note: str | None = None  # what became of the pin (a key gone: the pool served it)
    # The client's address: the peer's, or the one a trusted proxy forwarded (access.trusted_proxies).
    address: str | None = None

    KEY = ACCESS

    @property
    def pinned(self) -> bool:
        return self.pinned_group is not None or self.pinned_key is not None

    @property
    def admitted(self) -> bool:
        return self.client_id is not None and self.rejected is None


@dataclass
class ClientSent(Metadata):
    """The request as the client sent it, before keyrotor changed anything but its credential (the
    Access addon keeps references, no copies): the record says how the one sent upstream differs."""

    path: str = ""
    fields: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes | None = None

    KEY = "keyrotor.client_sent"


@dataclass
class KeyUse(Metadata):
    """Which upstream keys a request used, one attempt each, and where the last one stands."""

    attempts: list[AttemptLog] = field(default_factory=list)
    key_id: int | None = None  # the key of the latest attempt
    key_last4: str = ""
    upstream_id: int | None = None  # where the latest attempt went
    group_id: int | None = None
    candidate: int = 0  # which of the request's routes (core.routing.Candidate) the latest attempt took
    fallback_model: str | None = None  # the fallback model that answered, if the requested one did not
    requested_model: str | None = None  # as the client asked, before any alias or fallback renamed it
    probe: str = ""  # core.pool.Probe: the latest attempt is the probe of a resting key or pool
    scope: str | None = None  # the model the latest attempt's key answers for (core.pool's scope)
    scope_known: bool = False  # False: not read from the body yet (the one-group fast path reads it on demand)
    client_id: int | None = None  # whose request: one client may rest only a share of a pool
    suspect: int | None = None  # an attempt whose 5xx or lost answer no other key has yet confirmed or cleared
    refusal: str | None = None  # keyrotor's own refusal, as the row's error: "code: message"
    outcome: OutcomeKind | None = None  # the latest attempt's, None: the request's own fault
    settled: bool = False  # no more attempts: the answer is final or already reaching the client

    KEY = KEYPOOL

    @classmethod
    def from_plain(cls, values: dict[str, Any]) -> Self:
        outcome = values.get("outcome")
        return cls(
            **{
                **values,
                "attempts": [AttemptLog(**a) for a in values.get("attempts") or ()],
                "outcome": OutcomeKind(outcome) if outcome else None,
            }
        )

    def tried_keys(self) -> frozenset[int]:
        return frozenset(a.key_id for a in self.attempts)


@dataclass
class RequestedModel(Metadata):
    """The model upstream will act on (None: the request names none), and where it is named:
    body (a JSON body's top-level key), form, query or deployment (an Azure path). Never changed
    once read (core.request_model.NONE is one shared instance)."""

    model: str | None = None
    source: str = ""

    KEY = MODEL


CLIENT_REQUEST = "keyrotor.client_request"


@dataclass
class ClientRequest(Metadata):
    """What the client sent, kept by the key pool when it changes the request for upstream (an
    Azure deployment path, a relay's prefix, an alias's upstream name in the body, a retry's
    upstream): the record, the flow list and "copy as curl" show the client's request."""

    path: str
    model: str | None = None  # the model as the client named it
    renamed: str | None = None  # the name the body now carries instead, when renamed for upstream

    KEY = CLIENT_REQUEST


@dataclass
class UsageInjection(Metadata):
    """The usage addon asked upstream for a stream's token usage that the client did not ask for."""

    upstream_body: bytes | None = None  # a whole answer as upstream sent it, before its usage chunk went

    KEY = USAGE


@dataclass
class CountedUsage(Metadata):
    """What keyrotor counted of a stream its client left before upstream's usage (core/tokens.py)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    how: str = ""  # the tokenizer's name, or "estimate"
    note: str = ""  # what the row says of it

    KEY = "keyrotor.spend.counted"

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


@dataclass
class FlowLabels(Metadata):
    """The client's labels of its request (core/tags.py), taken off the headers before anything goes upstream."""

    tags: list[str] = field(default_factory=list)
    session: str | None = None

    KEY = "keyrotor.labels"
