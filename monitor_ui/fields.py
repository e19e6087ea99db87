"""What the upstream, group and model pages accept: one check each, shared by the forms and the JSON API."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import HTTPException
from pydantic import AfterValidator, BaseModel, ValidationError

from config import parse_http_url
from monitor_ui.errors import sentence

# Names appear in URLs, in UPSTREAM/GROUP labels and as Prometheus label values: no slashes, no spaces.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
API_VERSION_PATTERN = r"[A-Za-z0-9._-]{1,40}"
MAX_MODEL_LENGTH = 200
MAX_FALLBACKS = 20


def check_name(value: str) -> str:
    value = value.strip()
    if not re.fullmatch(NAME_PATTERN, value):
        raise ValueError(f"a name is {NAME_RULE}")
    return value


def check_base_url(value: str) -> str:
    return parse_http_url(value.strip())


def check_api_version(value: str | None) -> str | None:
    value = (value or "").strip()
    if not value:
        return None
    if not re.fullmatch(API_VERSION_PATTERN, value):
        raise ValueError("an api-version is up to 40 letters, digits, '.', '_' or '-', like 2024-10-21")
    return value


def check_model(value: str) -> str:
    """A model name as clients send it: relays use slashes (openai/gpt-4o), nobody uses spaces."""
    value = value.strip()
    if not value or len(value) > MAX_MODEL_LENGTH or not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError(f"a model name is 1-{MAX_MODEL_LENGTH} characters without spaces")
    return value


def check_optional_model(value: str | None) -> str | None:
    return check_model(value) if value and value.strip() else None


Name = Annotated[str, AfterValidator(check_name)]
BaseUrl = Annotated[str, AfterValidator(check_base_url)]
ApiVersion = Annotated[str | None, AfterValidator(check_api_version)]
Model = Annotated[str, AfterValidator(check_model)]
OptionalModel = Annotated[str | None, AfterValidator(check_optional_model)]


def problem_of(error: ValidationError) -> str:
    """The first problem as a sentence a person reads: `weight: must be above 0.`"""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    return sentence(f"{where}: {message}" if where else message)


def from_form[M: BaseModel](schema: type[M], /, **fields: object) -> M:
    """A form's fields checked as the JSON API checks its body; 422 with the first problem."""
    try:
        return schema.model_validate(fields)
    except ValidationError as e:
        raise HTTPException(422, problem_of(e)) from None
