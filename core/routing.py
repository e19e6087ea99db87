"""Which upstream group serves a request: by its model, highest priority first, weighted within one.

A model some group lists goes only to the groups that list it, then to its fallback models
(in the order an admin gave them), each routed the same way. A group whose model list is
empty (a catch-all, like a fresh install's default/default) serves the models no group
lists: a prompt meant for a relay never reaches it, unless an admin names one of those
models as a fallback. Requests without a model go to the default group.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import unquote_plus

DEFAULT = "default"


class Dialect(StrEnum):
    OPENAI = "openai"  # OpenAI itself and the relay stations that copy its API
    AZURE = "azure"  # Azure OpenAI: deployments in the path, api-version, the api-key header


@dataclass(frozen=True)
class Upstream:
    id: int
    name: str
    base_url: str | None  # None: the proxy's own upstream (proxy.upstream, --mode reverse:URL)
    dialect: Dialect = Dialect.OPENAI
    api_version: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class Group:
    id: int
    upstream: Upstream
    name: str
    priority: int = 0
    weight: float = 1.0
    enabled: bool = True
    models: dict[str, str | None] = field(default_factory=dict)  # client's name → upstream's (None: same)
    models_fetched: bool = False  # the list came from upstream once, so the schedule keeps it fresh

    @property
    def label(self) -> str:
        return f"{self.upstream.name}/{self.name}"

    @property
    def serves_every_model(self) -> bool:
        return not self.models

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models

    def upstream_model(self, model: str) -> str:
        return self.models.get(model) or model


@dataclass(frozen=True)
class Candidate:
    """One way to serve a request: this group, asked for `upstream_model`, answering as `model`."""

    group: Group
    model: str | None  # the model the client gets back (the requested one, or a fallback)
    upstream_model: str | None
    fallback_from: str | None = None  # the requested model, when `model` is one of its fallbacks

    @property
    def renames(self) -> bool:
        return self.model is not None and self.upstream_model != self.model


class RouteTable:
    """Routes built once per admin change; `candidates` is what each request asks."""

    def __init__(self, groups: list[Group], fallbacks: dict[str, list[str]] | None = None) -> None:
        self.groups = [g for g in groups if g.enabled and g.upstream.enabled]
        self.by_id = {g.id: g for g in groups}
        self.fallbacks = fallbacks or {}
        self._by_model: dict[str, list[Group]] = {}
        for group in self.groups:
            for model in group.models:
                self._by_model.setdefault(model, []).append(group)
        self._every_model = [g for g in self.groups if g.serves_every_model]
        # Listed by any group, enabled or not: a disabled relay's models do not go to a catch-all either.
        self._listed = frozenset(model for g in groups for model in g.models)
        defaults = [g for g in self.groups if g.label == f"{DEFAULT}/{DEFAULT}"]
        ranked = defaults or sorted(self.groups, key=lambda g: (-g.priority, g.id))
        self.default_group = ranked[0] if ranked else None
        # The common case: one group for everything, nothing renamed. Then the request's model
        # need not even be read.
        self.trivial = (
            len(self.groups) == 1 and self.groups[0].serves_every_model and not self.fallbacks and not self._listed
        )
        self.only = Candidate(self.groups[0], None, None) if self.trivial else None

    def dialect_of(self, group_id: int | None) -> Dialect:
        """How the group's upstream takes its key (OpenAI's way when the group is unknown or gone)."""
        group = self.by_id.get(group_id) if group_id is not None else None
        return group.upstream.dialect if group else Dialect.OPENAI

    def groups_for(self, model: str) -> list[Group]:
        """The groups that list `model`; for a model no group lists, the catch-alls."""
        if model in self._listed:
            return self._by_model.get(model, [])
        return self._every_model

    def is_listed(self, model: str | None) -> bool:
        """Some group lists `model` by name (enabled or not): only such groups may serve it."""
        return model is not None and model in self._listed

    def candidates(self, model: str | None, rng: random.Random | None = None) -> list[Candidate]:
        """Where to try a request for `model`, in order; empty when nothing serves it."""
        if model is None:
            group = self.default_group
            return [Candidate(group, None, None)] if group is not None else []
        found = [Candidate(g, model, g.upstream_model(model)) for g in ordered(self.groups_for(model), rng)]
        for fallback in self.fallbacks.get(model, ()):
            groups = ordered(self.groups_for(fallback), rng)
            found += [Candidate(g, fallback, g.upstream_model(fallback), fallback_from=model) for g in groups]
        return found

    def listed_models(self) -> list[str]:
        """Every model some group lists by name, each once, in a stable order."""
        return sorted(self._by_model)


def models_list(models: list[str], created: int) -> bytes:
    """OpenAI's list format for GET /v1/models."""
    return json.dumps({"object": "list", "data": [_listed(m, created) for m in models]}).encode()


def with_listed_models(body: bytes, models: list[str], created: int) -> bytes | None:
    """An upstream's own model list with `models` added where missing; None when it is not a list."""
    try:
        document = json.loads(body)
        data = document["data"]
        present = {item.get("id") for item in data if isinstance(item, dict)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    data += [_listed(m, created) for m in models if m not in present]
    return json.dumps(document).encode()


def _listed(model: str, created: int) -> dict[str, str | int]:
    return {"id": model, "object": "model", "created": created, "owned_by": "keyrotor"}


def reverse_target_of(modes: list[str] | tuple[str, ...]) -> str:
    """The reverse-proxy target (scheme://host[:port]) of mitmproxy's `mode` option: the default upstream's URL.

    Empty outside reverse mode, where only upstreams with a URL of their own can be reached.
    """
    for mode in modes:
        if mode.startswith("reverse:"):
            return mode.removeprefix("reverse:").rstrip("/")
    return ""


def ordered(groups: list[Group], rng: random.Random | None = None) -> list[Group]:
    """Highest priority first; within a priority, a weighted random order (each group once)."""
    if len(groups) < 2:
        return groups
    choices = rng.choices if rng is not None else random.choices
    by_priority: dict[int, list[Group]] = {}
    for group in groups:
        by_priority.setdefault(group.priority, []).append(group)
    result = []
    for priority in sorted(by_priority, reverse=True):
        tier = list(by_priority[priority])
        while len(tier) > 1:
            weights = [max(g.weight, 0.0) or 1e-9 for g in tier]
            pick = choices(range(len(tier)), weights=weights)[0]
            result.append(tier.pop(pick))
        result += tier
    return result


# --------------------------------------------------------------------------- reading the model

_MULTIPART_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.I)
_MODEL_PART = re.compile(rb'content-disposition:[^\r\n]*\bname="model"', re.I)
# "model": "<plain name>" at the first "model" key: inside JSON strings quotes are escaped, so the
# raw key is a real one, and OpenAI's request bodies nest no other "model" string before theirs.
_MODEL_PAIR = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')


def is_multipart(body: bytes) -> bool:
    return body[:2] == b"--"  # a form body opens with its boundary; JSON with { or blanks


def requested_model(content_type: str, body: bytes) -> str | None:
    """The `model` of a JSON body, or of the multipart form field audio uploads carry.

    Read with a look at the first "model" key, not a parse of the whole body (which may be
    megabytes of images); a value with escapes falls back to the JSON parser.
    """
    if not body:
        return None
    if "multipart/form-data" in content_type:
        return _multipart_model(content_type.encode("latin-1", "replace"), body)
    at = body.find(b'"model"')
    if at < 0:
        return None
    pair = _MODEL_PAIR.match(body, at)
    if pair is not None:
        return pair.group(1).decode("utf-8", "replace")
    try:
        value = json.loads(body)
    except ValueError:
        return None  # upstream answers the client with its own 400
    model = value.get("model") if isinstance(value, dict) else None
    return model if isinstance(model, str) and model else None


def query_model(path: str) -> str | None:
    """The `?model=` of a URL: how a Realtime (WebSocket) session names its model."""
    _, sep, query = path.partition("?")
    if not sep:
        return None
    for item in query.split("&"):
        name, _, value = item.partition("=")
        if name == "model" and value:
            return unquote_plus(value)[:256]
    return None


def _multipart_model(content_type: bytes, body: bytes) -> str | None:
    boundary = _MULTIPART_BOUNDARY.search(content_type)
    if boundary is None:
        return None
    for part in body.split(b"--" + boundary.group(1)):
        head, sep, value = part.partition(b"\r\n\r\n")
        if sep and _MODEL_PART.search(head):
            model = value.removesuffix(b"\r\n").decode("utf-8", "replace").strip()
            return model or None
    return None


# --------------------------------------------------------------------------- renaming


def _model_value(model: str) -> re.Pattern[bytes]:
    encoded = json.dumps(model).encode()
    return re.compile(rb'("model"\s*:\s*)' + re.escape(encoded))


def renamed_model(body: bytes, old: str, new: str, count: int = 0) -> bytes:
    """`body` with every `"model": "<old>"` pair saying `new` (count=1: only the first).

    Inside a JSON string a quote is escaped, so the raw pair appears only where it is a key
    and its value: the bytes around it stay exactly as they came.
    """
    if old == new or old.encode() not in body:
        return body
    replacement = json.dumps(new).encode().replace(b"\\", b"\\\\")
    return _model_value(old).sub(rb"\1" + replacement, body, count=count)
