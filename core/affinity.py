"""Key affinity: which upstream key owns an object, and which objects a request refers to.

OpenAI scopes files, batches, stored responses, vector stores, uploads, fine-tuning jobs,
assistants, threads, runs and messages to the project of the key that made them: another
key's project answers 404. So a request naming such an object must go to the key that
made it. Ownership is learnt from successful answers (their `id` and `object`) and kept
in storage; ids are never rewritten. Pure functions only: the key pool addon reads
requests and answers, storage keeps the map.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.classify import HeaderLookup
from core.errors import OpenAIError
from core.metadata import REFERENCED, AccessVerdict, KeyUse
from core.usage import events_end, split_events

# `object` values of the answers that create (or show) an owned object → the kind stored.
KINDS = {
    "file": "file",
    "batch": "batch",
    "response": "response",
    "vector_store": "vector_store",
    "upload": "upload",
    "fine_tuning.job": "fine_tuning_job",
    "assistant": "assistant",
    "thread": "thread",
    "thread.run": "run",
    "thread.message": "message",
    "conversation": "conversation",
}
# Fields of an owned object that name other objects of the same project.
NESTED_IDS = {
    "input_file_id": "file",
    "output_file_id": "file",
    "error_file_id": "file",
    "training_file": "file",
    "validation_file": "file",
    "thread_id": "thread",
    "assistant_id": "assistant",
    "run_id": "run",
}
# Request body fields that refer to objects (found at any depth: Responses tools and
# content parts, assistants' tool_resources nest them).
REFERENCE_FIELDS = frozenset(
    {
        "input_file_id",
        "file_id",
        "file_ids",
        "previous_response_id",
        "vector_store_ids",
        "training_file",
        "validation_file",
        "assistant_id",
        "thread_id",
    }
)
# A body is parsed only when it may hold one of those fields. Each has an underscore, and
# bodies have few (base64 images none): the underscores are visited with memchr-fast finds,
# their tails compared first, then the names; `in` over a whole body costs ~2 ns a byte.
HINT_TAILS = (b'id"', b'ids"', b'file"')
NAMES_AT_UNDERSCORE = tuple((name.encode() + b'"', name.rfind("_")) for name in sorted(REFERENCE_FIELDS))
MAX_UNDERSCORES = 256  # beyond: a body full of them (code in a prompt), scanned whole instead
# Path collections whose next segment is an object id; nested ones ("runs", "messages",
# "files" under a vector store) are read by the same rule.
COLLECTIONS = frozenset(
    {
        "files",
        "batches",
        "responses",
        "vector_stores",
        "uploads",
        "jobs",
        "assistants",
        "threads",
        "runs",
        "messages",
        "conversations",
    }
)
API_PREFIXES = (
    "/v1/files",
    "/v1/batches",
    "/v1/responses",
    "/v1/vector_stores",
    "/v1/uploads",
    "/v1/fine_tuning/jobs",
    "/v1/assistants",
    "/v1/threads",
    "/v1/conversations",
)
# Stream events whose payload is (or holds, under "response") an object to learn.
FINAL_EVENTS = frozenset(
    {
        "response.completed",
        "response.incomplete",
        "response.failed",
        "thread.created",
        "thread.run.created",
        "thread.message.created",
    }
)


@dataclass(frozen=True)
class OwnedObject:
    id: str
    kind: str


# How OpenAI's ids open, for objects keyrotor learns of only by a key answering for them.
ID_PREFIXES = (
    ("file-", "file"),
    ("file_", "file"),
    ("batch_", "batch"),
    ("resp_", "response"),
    ("vs_", "vector_store"),
    ("upload_", "upload"),
    ("ftjob-", "fine_tuning_job"),
    ("asst_", "assistant"),
    ("thread_", "thread"),
    ("run_", "run"),
    ("msg_", "message"),
    ("conv_", "conversation"),
)


def guess_kind(object_id: str) -> str:
    return next((kind for prefix, kind in ID_PREFIXES if object_id.startswith(prefix)), "object")


@dataclass(frozen=True)
class Ownership:
    """What one answer taught: `key_id` owns what it `created` and what it `answered` for.

    `used` are the ids the request named (the flow used them); `answered` those among them, and
    the objects a read showed, whose owner keyrotor learns from this answer.
    """

    flow_id: str
    key_id: int
    created: tuple[OwnedObject, ...] = ()
    used: tuple[str, ...] = ()
    answered: tuple[OwnedObject, ...] = ()
    client_id: int | None = None  # the client whose request it answered
    claimed: frozenset[str] = frozenset()  # the ids that are that client's (tenancy): what it made

    @property
    def owned(self) -> tuple[OwnedObject, ...]:
        return self.created + self.answered

    def client_of(self, object_id: str) -> int | None:
        """The client an object learnt here belongs to; None: nobody's (made before, or elsewhere)."""
        return self.client_id if object_id in self.claimed else None


def learnt(
    flow_id: str,
    key_id: int,
    method: str,
    referenced: tuple[str, ...],
    shown: list[OwnedObject],
    client_id: int | None = None,
    own: bool = False,
) -> Ownership | None:
    """What a successful answer of `key_id` teaches: a POST created what it shows (but what the
    request named), anything else only showed it; the named objects are this key's too.

    What a POST of `client_id` created is that client's; so is what any answer shows for the first
    time when the request named only the client's `own` objects (a batch's output file)."""
    named = set(referenced)
    new = tuple(o for o in shown if o.id not in named)
    answered = tuple(OwnedObject(i, guess_kind(i)) for i in referenced)
    if method == "POST":
        created, answered = new, answered
    else:
        created, answered = (), answered + new
    if not created and not answered:
        return None
    claimed: frozenset[str] = frozenset()
    if client_id is not None:
        claimed = frozenset(o.id for o in (new if own else created))
    return Ownership(flow_id, key_id, created, referenced, answered, client_id, claimed)


def taught(
    flow_id: str,
    metadata: dict[str, Any],
    method: str,
    referenced: tuple[str, ...],
    shown: list[OwnedObject],
    tenants: Mapping[str, int],
) -> Ownership | None:
    """What a successful answer teaches (`learnt`), read from the flow's `metadata`: the key that
    answered, and the client (whose objects are `tenants`); None: nothing to learn."""
    use = KeyUse.of(metadata)
    if use is None or use.key_id is None or use.refusal is not None:
        return None
    access = AccessVerdict.of(metadata)
    client_id = access.client_id if access is not None else None
    own = derives_from_own(referenced, client_id, tenants)
    return learnt(flow_id, use.key_id, method, referenced, shown, client_id, own)


@dataclass
class Affinity:
    """Where a request must go because of the objects it names."""

    referenced: tuple[str, ...]
    owner: int | None = None  # the key that owns the owned ones
    owned: tuple[str, ...] = ()  # the referenced ids keyrotor knows an owner of
    owners: dict[int, list[str]] = field(default_factory=dict)  # key id → its referenced objects

    @property
    def conflict(self) -> bool:
        return len(self.owners) > 1


def is_object_path(path: str) -> bool:
    return path.startswith(API_PREFIXES)


def path_ids(path: str) -> list[str]:
    """Object ids in an API path: `/v1/threads/thread_1/runs/run_2` → [thread_1, run_2]."""
    if not is_object_path(path):
        return []
    parts = path.partition("?")[0].split("/")
    ids = []
    for index in range(2, len(parts) - 1):
        if parts[index] in COLLECTIONS and parts[index + 1] and parts[index + 1] not in COLLECTIONS:
            ids.append(parts[index + 1])
    return ids


def _walk_references(value: Any, found: list[str]) -> None:
    if isinstance(value, dict):
        for name, item in value.items():
            if name in REFERENCE_FIELDS:
                if isinstance(item, str) and item:
                    found.append(item)
                elif isinstance(item, list):
                    found += [i for i in item if isinstance(i, str) and i]
                elif isinstance(item, dict | list):
                    _walk_references(item, found)
            elif isinstance(item, dict | list):
                _walk_references(item, found)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list):
                _walk_references(item, found)


def may_name_objects(body: bytes) -> bool:
    """Whether `body` may hold a field that refers to an object (cheap: no parsing)."""
    find, startswith = body.find, body.startswith
    at = find(b"_")
    visited = 0
    while at >= 0:
        if startswith(HINT_TAILS, at + 1) and any(startswith(n, at - off) for n, off in NAMES_AT_UNDERSCORE):
            return True
        visited += 1
        if visited > MAX_UNDERSCORES:
            return any(b"_" + tail in body for tail in HINT_TAILS)
        at = find(b"_", at + 1)
    return False


def body_ids(body: bytes | None) -> list[str]:
    """Object ids a JSON request body refers to; a body that names none is not parsed."""
    if not body or not may_name_objects(body):
        return []
    if body[:2] == b"--":
        return []  # a form upload: names no object
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []  # upstream answers with its own 400
    found: list[str] = []
    _walk_references(value, found)
    return found


def conversation_id(body: bytes | None) -> str | None:
    """The conversation a Responses request continues (`"conversation": "conv_…"` or `{"id": …}`);
    looked for only in requests to /v1/responses, whose bodies are read for it."""
    if not body or b'"conversation"' not in body:
        return None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    named = value.get("conversation") if isinstance(value, dict) else None
    if isinstance(named, dict):
        named = named.get("id")
    return named if isinstance(named, str) and named else None


def referenced_ids(path: str, body: bytes | None) -> tuple[str, ...]:
    """Every object id a request names, in its path or its body, each once, in order."""
    ids = path_ids(path) + body_ids(body)
    if path.startswith("/v1/responses") and (conversation := conversation_id(body)) is not None:
        ids.append(conversation)
    return tuple(dict.fromkeys(ids))


def referenced_once(metadata: dict[str, Any], path: str, body: bytes | None) -> tuple[str, ...]:
    """referenced_ids, kept in the flow's metadata: Tenancy and the key pool read the same request,
    and the scan is the hot path's (every request with a body)."""
    ids: tuple[str, ...] | None = metadata.get(REFERENCED)
    if ids is None:
        ids = metadata[REFERENCED] = referenced_ids(path, body)
    return ids


def resolve(referenced: tuple[str, ...], owners: Mapping[str, int]) -> Affinity:
    """Which key owns what `referenced` names (an id nobody is known to own is left out)."""
    affinity = Affinity(referenced)
    for object_id in referenced:
        key_id = owners.get(object_id)
        if key_id is not None:
            affinity.owners.setdefault(key_id, []).append(object_id)
    affinity.owned = tuple(i for ids in affinity.owners.values() for i in ids)
    if len(affinity.owners) == 1:
        affinity.owner = next(iter(affinity.owners))
    return affinity


def _objects_in(value: Any) -> Iterator[OwnedObject]:
    """An answer's owned object, what it names of its project, and a list's items."""
    if not isinstance(value, dict):
        return
    kind = KINDS.get(value.get("object"))  # type: ignore[arg-type]
    object_id = value.get("id")
    if kind is not None and isinstance(object_id, str) and object_id:
        yield OwnedObject(object_id, kind)
        for name, nested_kind in NESTED_IDS.items():
            nested = value.get(name)
            if isinstance(nested, str) and nested:
                yield OwnedObject(nested, nested_kind)
        inner = value.get("file")  # an upload that completed holds its file
        if isinstance(inner, dict):
            yield from _objects_in(inner)
    if value.get("object") == "list" and isinstance(value.get("data"), list):
        for item in value["data"][:1000]:
            yield from _objects_in(item)


def created_objects(body: bytes | None) -> list[OwnedObject]:
    """The owned objects a JSON answer shows (each once)."""
    if not body or body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return []
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    return list(dict.fromkeys(_objects_in(value)))


def shown_objects(
    streamed: list[OwnedObject] | None, headers: HeaderLookup, body: Callable[[], bytes | None]
) -> list[OwnedObject]:
    """The owned objects a successful answer shows: what its stream's final events held
    (`streamed`), else its JSON body's (`body` raises ValueError when it cannot be decoded)."""
    if streamed is not None:
        return streamed
    if "json" not in (headers.get("content-type", "") or ""):
        return []
    try:
        return created_objects(body())
    except ValueError:
        return []


def watches_stream(path: str, status: int, headers: HeaderLookup) -> bool:
    """A successful stream on an object path shows the object it made in its final event
    (Responses: response.completed): it is watched as it passes."""
    return is_object_path(path) and status < 300 and "text/event-stream" in (headers.get("content-type", "") or "")


def event_type(event: bytes) -> str | None:
    """An SSE event's `event:` name (cheap: no JSON parsing)."""
    for line in event.split(b"\n", 3)[:3]:
        if line.startswith(b"event:"):
            return line[6:].strip().decode("utf-8", "replace")
    return None


def streamed_objects(event: bytes) -> list[OwnedObject]:
    """The owned objects a final stream event holds (`response.completed`'s response, a created thread...)."""
    data = b"\n".join(line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:"))
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return []
    if isinstance(value, dict) and isinstance(value.get("response"), dict):
        value = value["response"]
    return list(dict.fromkeys(_objects_in(value)))


def is_final_event(event: bytes) -> bool:
    kind = event_type(event)
    if kind is not None:
        return kind in FINAL_EVENTS
    # No `event:` line: the type is in the JSON, near the start.
    head = event[:120]
    return any(b'"' + name.encode() + b'"' in head for name in FINAL_EVENTS)


class ObjectWatch:
    """A stream callable that passes every byte on at once and keeps the objects its final
    events show (only those events are parsed)."""

    MAX_HELD_BYTES = 8 * 2**20  # a final event holds the whole response: room for a big one

    def __init__(self) -> None:
        self.objects: list[OwnedObject] = []
        self._held = b""

    def __call__(self, data: bytes) -> bytes:
        buffer = self._held + data if self._held else data
        end = events_end(buffer) if data else len(buffer)
        if end:
            for event in split_events(buffer[:end]):
                if is_final_event(event):
                    self.objects += streamed_objects(event)
        self._held = buffer[end:] if len(buffer) - end <= self.MAX_HELD_BYTES else b""
        return data


# --------------------------------------------------------------------------- refusals


def _named(ids: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(f"`{i}`" for i in ids[:5])
    return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def owner_unavailable(ids: tuple[str, ...], key_id: int, why: str) -> OpenAIError:
    """409: the key that owns the objects cannot serve, and no other key can see them."""
    return OpenAIError(
        409,
        f"The object {_named(ids)} belongs to upstream key #{key_id}, which {why}. Objects stay with the key"
        " that made them (another key's project answers 404): re-enable or reset that key, or make the"
        " object again.",
        "invalid_request_error",
        "object_owner_unavailable",
        {"x-should-retry": "false"},
    )


def owners_conflict(affinity: Affinity) -> OpenAIError:
    """409: the request names objects of different keys, and no key can see them all."""
    parts = "; ".join(f"{_named(ids)} with key #{key_id}" for key_id, ids in sorted(affinity.owners.items()))
    return OpenAIError(
        409,
        f"This request refers to objects made with different upstream keys ({parts}); each key's project"
        " sees only its own objects, so no single key can serve it.",
        "invalid_request_error",
        "object_owner_conflict",
        {"x-should-retry": "false"},
    )


def owner_resting(ids: tuple[str, ...], key_id: int, wait: float | None, reason: str | None) -> OpenAIError:
    """429 (rate limited) or 503 (cooling): the owner only rests; Retry-After says when it is back."""
    retry_after = str(max(1, math.ceil(wait))) if wait is not None else "1"
    why = f" ({reason})" if reason else ""
    message = (
        f"The object {_named(ids)} belongs to upstream key #{key_id}, which is resting{why}; only it can serve"
        " this request. Retry after the Retry-After seconds."
    )
    if reason and "429" in reason:
        return OpenAIError(429, message, "requests", "rate_limit_exceeded", {"retry-after": retry_after})
    return OpenAIError(503, message, "server_error", "object_owner_cooling", {"retry-after": retry_after})


# --------------------------------------------------------------------------- tenancy
#
# Every object keyrotor sees created belongs to the client that created it as well as to the
# key: another client naming it is answered as upstream answers an id it does not know (404, in
# the kind's own words), before anything is sent, and lists show a client only its own.
# Objects keyrotor did not see created (made upstream directly, or before tenancy) have no
# client: only clients an admin allows (`clients set NAME --legacy-objects`) reach them.


def foreign_ids(
    referenced: tuple[str, ...], client_id: int, tenants: Mapping[str, int], legacy_allowed: bool
) -> tuple[str, ...]:
    """The ids among `referenced` that client `client_id` may not name (`tenants`: object id →
    the client that created it; an id not there has no client, a legacy object)."""
    foreign = []
    for object_id in referenced:
        owner = tenants.get(object_id)
        if owner == client_id or (owner is None and legacy_allowed):
            continue
        foreign.append(object_id)
    return tuple(foreign)


def visible_to(object_id: str, client_id: int, tenants: Mapping[str, int], legacy_allowed: bool) -> bool:
    owner = tenants.get(object_id)
    return owner == client_id or (owner is None and legacy_allowed)


def derives_from_own(referenced: tuple[str, ...], client_id: int | None, tenants: Mapping[str, int]) -> bool:
    """Whether what a request names is all the caller's own: then objects its answer shows for
    the first time (a batch's output file, a thread's messages) are the caller's too."""
    return client_id is not None and bool(referenced) and all(tenants.get(i) == client_id for i in referenced)


@dataclass(frozen=True)
class NotFound:
    """Upstream's own 404 for an id its project does not hold (no keyrotor header: nothing tells
    the caller that keyrotor answered, or that the object exists)."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def body(self) -> bytes:
        error = {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()

    @staticmethod
    def headers() -> dict[str, str]:
        return {"content-type": "application/json"}


# How OpenAI says it holds no such object, by kind, named in a path.
NOT_FOUND_IN_PATH: dict[str, tuple[str, str | None]] = {
    "file": ("No such File object: {id}", "id"),
    "batch": ("No batch found with id '{id}'.", "batch_id"),
    "response": ("Response with id '{id}' not found.", None),
    "vector_store": ("No vector store found with id '{id}'.", None),
    "upload": ("No such Upload object: {id}", "upload_id"),
    "fine_tuning_job": ("Could not find fine-tuning job: {id}", "fine_tuning_job_id"),
    "assistant": ("No assistant found with id '{id}'.", None),
    "thread": ("No thread found with id '{id}'.", None),
    "run": ("No run found with id '{id}'.", None),
    "message": ("No message found with id '{id}'.", None),
    "conversation": ("Conversation with id '{id}' not found.", None),
    "object": ("No such object: {id}", None),
}


def _field_of(value: Any, object_id: str) -> str | None:
    """The body field that names `object_id` (the refusal's slow path only)."""
    if isinstance(value, dict):
        for name, item in value.items():
            if name in REFERENCE_FIELDS and (item == object_id or (isinstance(item, list) and object_id in item)):
                return str(name)
            if isinstance(item, dict | list):
                found = _field_of(item, object_id)
                if found is not None:
                    return found
    elif isinstance(value, list):
        for item in value:
            found = _field_of(item, object_id)
            if found is not None:
                return found
    return None


def not_found(object_id: str, path: str, body: bytes | None) -> NotFound:
    """What upstream answers a project that does not hold `object_id`, named in `path` or `body`."""
    if object_id not in path_ids(path):
        try:
            name = _field_of(json.loads(body or b"null"), object_id)
        except (ValueError, UnicodeDecodeError):
            name = None
        if name is None and object_id == conversation_id(body):
            name = "conversation"
        if name == "previous_response_id":
            return NotFound(
                404, f"Previous response with id '{object_id}' not found.", name, "previous_response_not_found"
            )
        if name == "input_file_id" and path.partition("?")[0].rstrip("/") == "/v1/batches":
            return NotFound(
                400, f"Invalid 'input_file_id': '{object_id}'. File with ID '{object_id}' does not exist.", name
            )
        if name in ("file_id", "file_ids", "input_file_id", "training_file", "validation_file"):
            return NotFound(404, f"No such File object: {object_id}", name)
        if name is not None:
            message, _ = NOT_FOUND_IN_PATH[guess_kind(object_id)]
            return NotFound(404, message.format(id=object_id), name)
    message, param = NOT_FOUND_IN_PATH[guess_kind(object_id)]
    return NotFound(404, message.format(id=object_id), param)


@dataclass(frozen=True)
class TenantRefusal:
    """A client named another client's object (or one it may not reach): refused, for the audit log."""

    client_id: int
    client_name: str | None
    object_ids: tuple[str, ...]
    method: str
    path: str
    flow_id: str
    at: float


# --------------------------------------------------------------------------- lists

# GET on these lists every object of the project: the answer is filtered to the caller's.
LIST_PATHS = frozenset(
    {
        "/v1/files",
        "/v1/batches",
        "/v1/vector_stores",
        "/v1/assistants",
        "/v1/fine_tuning/jobs",
        "/v1/uploads",
        "/v1/threads",
    }
)
FOLLOW_UP_LIMIT = 100  # items asked for on each extra page fetched to fill an empty one
MAX_FOLLOW_UPS = 50


def is_list(method: str, path: str) -> bool:
    return method == "GET" and path.partition("?")[0].rstrip("/") in LIST_PATHS


@dataclass
class Page:
    """One list answer, filtered: what the caller sees, and where upstream's page ended."""

    value: dict[str, Any]  # the answer, its `data` filtered
    has_more: bool
    upstream_last: str | None  # the last id upstream's page held: the cursor of the next one

    def body(self) -> bytes:
        return json.dumps(self.value).encode()


def truncated(page: Page, limit: int | None) -> Page:
    """At most `limit` items, as the client asked: what is cut is on the next page."""
    data = page.value["data"]
    if limit is None or len(data) <= limit:
        return page
    value = {**page.value, "data": data[:limit], "has_more": True}
    if "first_id" in value or "last_id" in value:
        value["first_id"], value["last_id"] = data[0]["id"], data[limit - 1]["id"]
    return Page(value, True, page.upstream_last)


def filtered_page(body: bytes, visible: Callable[[str], bool]) -> Page | None:
    """Upstream's list answer with only what `visible` lets through; None: not a list answer."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("data"), list):
        return None
    items = value["data"]
    ids = [item.get("id") if isinstance(item, dict) else None for item in items]
    last = next((i for i in reversed(ids) if isinstance(i, str)), None)
    kept = [item for item, i in zip(items, ids, strict=True) if isinstance(i, str) and visible(i)]
    value["data"] = kept
    if "first_id" in value or "last_id" in value:
        value["first_id"] = kept[0]["id"] if kept else None
        value["last_id"] = kept[-1]["id"] if kept else None
    return Page(value, bool(value.get("has_more")), last)


def merged_page(first: Page, more: Page) -> Page:
    """An empty filtered page followed by the next one upstream had."""
    value = dict(more.value)
    for name in first.value:
        value.setdefault(name, first.value[name])
    return Page(value, more.has_more, more.upstream_last)


def next_page_query(query: list[tuple[str, str]], after: str) -> list[tuple[str, str]]:
    """The list's query for the page after `after`, as many items as one page may hold."""
    kept = [(k, v) for k, v in query if k not in ("after", "limit")]
    return [*kept, ("after", after), ("limit", str(FOLLOW_UP_LIMIT))]
