"""Models: which groups serve each model (and as what name upstream), the groups that serve every model,
and each model's fallbacks, with their edit form; the page and its JSON twin."""

from __future__ import annotations

import re
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from monitor_ui import shapes, views
from monitor_ui.deps import AdminApi, AdminApiChange, AdminForm, AdminPage, Conn, PageOf, WriteConn
from monitor_ui.errors import refused_as_http
from monitor_ui.fields import MAX_FALLBACKS, Model, check_model, from_form
from monitor_ui.pages import Page, done_or_refused
from storage import routes

router = APIRouter(prefix="/models", tags=["models"])
api = APIRouter(prefix="/api/models", tags=["models"])


class Fallbacks(BaseModel):
    fallbacks: list[Model] = Field(max_length=MAX_FALLBACKS, description="tried in this order; [] clears them")


class FallbacksOf(Fallbacks):
    model: Model


def models_overview(conn) -> dict:
    """Every model a group lists or that has fallbacks, the groups serving it, and the catch-all groups."""
    groups = {row["id"]: views.group_summary(row) for row in routes.list_groups(conn)}
    fallbacks = routes.fallbacks(conn)
    served: dict[str, list[dict]] = {}
    for row in routes.list_models(conn):
        group = groups[row["group_id"]]
        served.setdefault(row["model"], []).append(
            {
                "id": group["id"],
                "label": group["label"],
                "upstream_model": row["upstream_model"] or row["model"],
                "source": row["source"],
                "priority": group["priority"],
                "serving": group["serving"],
                "usable_keys": group["usable_keys"],
                "cannot_serve": group["cannot_serve"],
            }
        )
    every_model = [
        {key: g[key] for key in ("id", "label", "priority", "serving", "usable_keys", "cannot_serve")}
        for g in groups.values()
        if g["every_model"]
    ]
    models = []
    for model in sorted(set(served) | set(fallbacks)):
        routed = served.get(model) or every_model  # a model no group lists goes to the catch-all groups
        usable = sum(g["usable_keys"] for g in routed if g["serving"])
        models.append(
            {
                "model": model,
                "groups": served.get(model, []),
                "fallbacks": fallbacks.get(model, []),
                "usable_keys": usable,
                "cannot_serve": None if usable else _no_key(model, routed),
            }
        )
    return {"models": models, "every_model_groups": every_model}


def _no_key(model: str, routed: list[dict]) -> str:
    if not any(g["serving"] for g in routed):
        return f"No enabled group serves {model}."
    return f"No usable key for {model} now: every group that serves it has none."


def _set_fallbacks(conn, model: str, fallbacks: list[str]) -> dict:
    with refused_as_http():
        routes.set_fallbacks(conn, model, fallbacks)
    return {"model": model, "fallbacks": routes.fallbacks(conn).get(model, [])}


def _render(page: Page, conn, status_code: int = 200, **extra) -> HTMLResponse:
    return page.render("models.html", {**models_overview(conn), "section": "models", **extra}, status_code)


@router.get("", response_class=HTMLResponse, dependencies=[AdminPage])
def list_models(page: PageOf, conn: Conn, done: str | None = None):
    """Every model, the groups that serve it with their upstream names, the catch-all groups, and fallbacks."""
    return _render(page, conn, message="Fallbacks saved." if done == "fallbacks" else None)


@api.get("", dependencies=[AdminApi], response_model=shapes.ModelsOverview)
def list_models_json(conn: Conn) -> dict:
    """Every model with the groups that serve it (and as what upstream) and its fallbacks; the catch-all groups."""
    return models_overview(conn)


@api.put("/{model:path}/fallbacks", dependencies=[AdminApiChange], response_model=shapes.FallbacksOf)
def update_fallbacks_json(model: str, wanted: Fallbacks, conn: WriteConn) -> dict:
    """The models tried, in order, after every group of `model` has failed; [] clears them."""
    try:
        model = check_model(model)
    except ValueError as e:
        raise HTTPException(422, f"Model: {e}.") from None
    return _set_fallbacks(conn, model, wanted.fallbacks)


@router.post("/fallbacks", response_class=HTMLResponse, dependencies=[AdminForm])
def edit_fallbacks(
    page: PageOf,
    conn: WriteConn,
    model: Annotated[str, Form(max_length=1000)] = "",
    fallbacks: Annotated[str, Form(max_length=10_000)] = "",
) -> Response:
    """Save a model's fallbacks from the page: names separated by commas or spaces, tried in that order."""

    def save() -> str:
        wanted = from_form(FallbacksOf, model=model, fallbacks=[f for f in re.split(r"[\s,]+", fallbacks) if f])
        _set_fallbacks(conn, wanted.model, wanted.fallbacks)
        return "/models?done=fallbacks"

    return done_or_refused(save, partial(_render, page, conn))
