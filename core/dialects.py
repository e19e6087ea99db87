"""How a request is addressed to each kind of upstream: its URL and where the key goes."""

from __future__ import annotations

import functools
from urllib.parse import urlsplit

from core.credentials import AUTHORIZATION, with_credential
from core.routing import Candidate, Dialect

API_KEY = b"api-key"
DEFAULT_AZURE_API_VERSION = "2024-10-21"


def upstream_url(candidate: Candidate, path: str, default_base_url: str) -> str:
    """The URL of `path` (the client's, query included) at the candidate's upstream.

    OpenAI dialect: the base URL followed by the path (a base ending in /v1 is not doubled).
    Azure: /openai/deployments/<deployment>/<operation>?api-version=..., where the
    deployment is the group's name for the model; requests without a model (files,
    batches) go to /openai/<operation>.
    """
    upstream = candidate.group.upstream
    base = (upstream.base_url or default_base_url).rstrip("/")
    if upstream.dialect != Dialect.AZURE:
        if base.endswith("/v1") and (path == "/v1" or path.startswith("/v1/") or path.startswith("/v1?")):
            path = path[3:]
        return base + path
    route, _, query = path.partition("?")
    operation = route.removeprefix("/v1/").lstrip("/")
    if urlsplit(base).path.endswith("/openai"):
        base = base.removesuffix("/openai")
    if candidate.upstream_model:
        prefix = f"/openai/deployments/{candidate.upstream_model}/"
    else:
        prefix = "/openai/"
    version = f"api-version={upstream.api_version or DEFAULT_AZURE_API_VERSION}"
    kept = "&".join(p for p in query.split("&") if p and not p.startswith("api-version="))
    return f"{base}{prefix}{operation}?{version}" + (f"&{kept}" if kept else "")


def with_key(dialect: Dialect, fields: tuple[tuple[bytes, bytes], ...], key: str) -> tuple[tuple[bytes, bytes], ...]:
    """The request's headers carrying `key` the way this upstream wants it.

    Azure takes it in `api-key` and never sees an Authorization header; OpenAI-style
    upstreams get it wherever the client put its own (Bearer, or api-key).
    """
    if dialect != Dialect.AZURE:
        return with_credential(fields, key)
    kept = tuple((n, v) for n, v in fields if n.lower() not in (AUTHORIZATION, API_KEY))
    return (*kept, (API_KEY, key.encode()))


def models_url(dialect: Dialect, base_url: str, api_version: str | None) -> str:
    """Where a key is probed and a group's models are listed (GET, no tokens spent)."""
    base = base_url.rstrip("/")
    if dialect == Dialect.AZURE:
        return f"{base}/openai/models?api-version={api_version or DEFAULT_AZURE_API_VERSION}"
    return f"{base}/models" if base.endswith("/v1") else f"{base}/v1/models"


def url_parts(url: str) -> tuple[bytes, str, int, str, bytes]:
    """An absolute URL as a request's data holds it: (scheme, host, port, netloc, path). The origin
    is parsed once per upstream (a request's URL setters would run IDNA on every request)."""
    cut = url.find("/", url.find("//") + 2)
    origin, path = (url, "/") if cut < 0 else (url[:cut], url[cut:])
    return (*_origin(origin), path.encode())


@functools.lru_cache(maxsize=256)
def _origin(origin: str) -> tuple[bytes, str, int, str]:
    parts = urlsplit(origin)
    scheme = parts.scheme.encode()
    return scheme, parts.hostname or "", parts.port or (443 if scheme == b"https" else 80), parts.netloc
