"""A request's journey as decisions, without a proxy: the failover matrix.

Each row runs one request the way addons/keypool.py's hooks do (plan, first key, the first
attempt's verdict, then core/failover.py's retries) against in-memory pools and a scripted
upstream, and reads back the decisions in order:

    a1 429       the attempt on group a's first key, and what upstream answered
    retry        the verdict on the first attempt (answer, retry, next_group, refuse, release)
    key a        a key of group a, free now; `wait a`: one may be waited for until the deadline
    leave a      the request leaves group a for the next route (group or fallback model)
    → 200        what the client gets ("renamed": the fallback's answer named as the client asked)
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from core.classify import OK, Outcome, OutcomeKind
from core.dispatch import (
    ClientRequest,
    Journey,
    Judgement,
    Move,
    Plan,
    Rename,
    Verdict,
    addressed,
    after_answer,
    after_error,
    first_key_now,
    judge,
    no_first_key,
    rename_back,
    renamed_back,
    retry_refusal,
    route,
    scope_of,
)
from core.failover import Failover
from core.metadata import KeyUse
from core.models import KeyState, PoolKey
from core.pool import Policy, Pool
from core.records import AttemptLog
from core.rotation import PROBE_POLL_SECONDS, PROOF_POLL_SECONDS, KeyWait, Rotation, RotationSettings
from core.routing import Candidate, Dialect, Group, RouteTable, Upstream

MODEL, FALLBACK, UNLISTED = "gpt-4o", "gpt-4o-mini", "gpt-4.1-nano"
UPSTREAM = Upstream(1, "up", "http://up.test")
SETTINGS = RotationSettings(max_attempts=3, wait_max_seconds=1, policy=Policy(pool_429_window_seconds=0))


def error_body(code: str, message: str = "") -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


# What upstream answers: status, headers, body. `refused` and `timeout` are no answer at all.
ANSWERS: dict[str, tuple[int, dict[str, str], bytes]] = {
    "200": (200, {"content-type": "application/json"}, json.dumps({"model": MODEL}).encode()),
    "400": (400, {}, error_body("invalid_request_error", "bad request")),
    "401": (401, {}, error_body("invalid_api_key")),
    "403": (403, {}, error_body("forbidden")),
    "429": (429, {}, error_body("rate_limit_exceeded", "Rate limit reached")),  # no hint: a 60 s cooldown
    "429+ra": (429, {"retry-after-ms": "50"}, error_body("rate_limit_exceeded", "Rate limit reached")),
    "429quota": (429, {}, error_body("insufficient_quota", "You exceeded your current quota")),
    "500": (500, {}, error_body("server_error")),
    "503": (503, {}, error_body("service_unavailable")),
    "404missing": (404, {}, error_body("model_not_found", "The model `gpt-4o` does not exist")),
    "400ctx": (400, {}, error_body("context_length_exceeded", "This model's maximum context length is 128000 tokens.")),
    "400filter": (400, {}, error_body("content_filter", "The response was filtered")),
}
NO_ANSWER = {"refused": httpx.ConnectError("connection refused"), "timeout": httpx.ReadTimeout("timed out")}
FIRST_ERRORS = {"refused": "ConnectError: connection refused", "timeout": "upstream timed out: nothing for 30 s"}


class World:
    """Groups a, b, … serving MODEL by priority (their keys a1, a2, …), and with `fallback` a group
    f serving FALLBACK only, which is MODEL's fallback model; with `catch_all` a group d that lists
    no model (d1, …), and with `unlisted_fallback` MODEL falls back to UNLISTED, which no group lists."""

    def __init__(
        self,
        layout: dict[str, int],
        script: dict[str, list[str]],
        fallback: int = 0,
        alias: str | None = None,
        catch_all: int = 0,
        unlisted_fallback: bool = False,
        shared: bool = False,
        unproven: frozenset[str] = frozenset(),
    ) -> None:
        groups, self.names, self.rotations, self.shared = [], {}, {}, shared
        served: dict[str, str | None] = {MODEL: alias, FALLBACK: None} if shared else {MODEL: alias}
        specs = [(name, count, dict(served)) for name, count in layout.items()]
        if fallback:
            specs.append(("f", fallback, {FALLBACK: None}))
        if catch_all:
            specs.append(("d", catch_all, {}))
        next_id = 1
        for gid, (name, count, models) in enumerate(specs, start=1):
            group = Group(gid, UPSTREAM, name, priority=100 - gid, models=models)
            keys = []
            for n in range(1, count + 1):
                keys.append(PoolKey(next_id, f"sk-{name}{n}", f"{name}{n}", KeyState.ACTIVE, None, None, 1.0, 0))
                self.names[next_id] = f"{name}{n}"
                next_id += 1
            pool = Pool()
            pool.replace_keys(keys)
            for key in keys:
                pool.runtime[key.id].proven = key.last4 not in unproven  # `unproven`: new since the start
            rotation = self.rotations[gid] = Rotation(pool)
            rotation.configure(SETTINGS)
            groups.append(group)
        fallbacks = [FALLBACK] if fallback or shared else []
        fallbacks += [UNLISTED] if unlisted_fallback else []
        self.table = RouteTable(groups, {MODEL: fallbacks} if fallbacks else None)
        self.script = {name: list(answers) for name, answers in script.items()}
        self.answered: list[str] = []  # the retries' answers, in order
        self.failover = Failover(self.rotations.get, lambda: SETTINGS, send=self.send)

    def answer_of(self, key: PoolKey, model: str = MODEL) -> str:
        """The script's next answer of `key` (`a1~` in the script: what a1 answers for FALLBACK)."""
        name = self.names[key.id]
        if self.shared and model == FALLBACK:
            name += "~"
        answers = self.script.get(name) or ["200"]
        return answers.pop(0) if len(answers) > 1 else answers[0]

    async def send(self, client, method, url, fields, body, first_token_seconds=0.0):
        value = dict(fields)[b"authorization"].decode().removeprefix("Bearer ")
        key = next(k for r in self.rotations.values() for k in r.pool.keys if k.value == value)
        token = self.answer_of(key, json.loads(body)["model"])
        self.answered.append(token)
        if token in NO_ANSWER:
            raise NO_ANSWER[token]
        status, headers, content = ANSWERS[token]
        now = time.time()
        return _answer(status, headers, content, now)


def _answer(status: int, headers: dict[str, str], content: bytes, now: float):
    from core.upstream import Answer

    return Answer(status, b"", httpx.Headers(headers), content, now, now, now)


async def journey(world: World, *, alive_for: int | None = None, client_leaves_first: bool = False) -> list[str]:
    """One request through the decisions, as the hooks apply them; `alive_for`: how many times the
    retries find the client still waiting."""
    decisions: list[str] = []
    body = json.dumps({"model": MODEL}).encode()
    routes = route(world.table, MODEL, None)
    assert isinstance(routes, list)
    plan = Plan(routes, ClientRequest("POST", "/v1/chat/completions", (), body, MODEL))
    chosen = first_key_now(plan, world.rotations.get)
    if chosen is None:
        chosen = await world.failover.first_key(plan, time.time() + SETTINGS.wait_max_seconds)
    if chosen is None:
        error = no_first_key(plan, world.rotations)
        return [*decisions, f"→ {error.status} {error.code}"]
    index, key = chosen
    candidate = plan.candidates[index]
    use = world.failover.begin(candidate, index, key, None, scope_of(candidate, plan))
    token = "client" if client_leaves_first else world.answer_of(key, candidate.upstream_model or MODEL)
    decisions.append(f"{world.names[key.id]} {token}")
    outcome: Outcome | None = None
    missing = timed_out = False
    if token == "client" or token in NO_ANSWER:
        message = "Client disconnected." if token == "client" else FIRST_ERRORS[token]
        verdict = world.failover.failed(use, message, lambda: MODEL, lambda: False, lambda: False)
        timed_out = token == "timeout"
    else:
        status, headers, content = ANSWERS[token]
        verdict, judged = world.failover.answered(
            use,
            index + 1 < len(plan.candidates),
            status,
            httpx.Headers(headers),
            content if status >= 400 else None,
            lambda: MODEL,
            lambda: False,
            lambda: False,
            fallback=plan.fallback_after(index),
        )
        outcome, missing = judged.outcome, judged.missing
    decisions.append(str(verdict))
    if verdict == Verdict.RELEASE:
        return [*decisions, "→ nobody"]
    if verdict == Verdict.ANSWER:
        return [*decisions, f"→ {ANSWERS[token][0]}" if token in ANSWERS else "→ 502"]
    calls = 0

    def alive() -> bool:
        nonlocal calls
        calls += 1
        return alive_for is None or calls <= alive_for

    too_long = verdict == Verdict.NEXT_MODEL
    result = await world.failover.retry(
        None,  # type: ignore[arg-type]
        use,
        plan,
        outcome,
        "http://up.test",
        missing,
        alive,
        too_long,
        timed_out,
    )
    answers = iter(world.answered)
    shared = len({c.group.id for c in plan.candidates}) < len(plan.candidates)
    for step in result.trail:
        group = ""
        if step.index < len(plan.candidates):
            on = plan.candidates[step.index]
            group = on.group.name + ("~" if shared and on.fallback_from else "")  # a~: group a, for the fallback
        if step.move == Move.LEAVE:
            decisions.append(f"leave {group}")
        elif step.move == Move.TAKE_KEY:
            decisions.append(f"{'wait' if step.wait else 'key'} {group}")
        elif step.move == Move.SEND:
            assert step.key is not None
            decisions.append(f"{world.names[step.key.id]}{'~' if group.endswith('~') else ''} {next(answers)}")
    assert use.settled
    if result.refuse:
        error = retry_refusal(plan, use, world.rotations)
        return [*decisions, f"→ {error.status} {error.code}"]
    ra = f" retry-after {result.retry_after}" if result.retry_after else ""  # after a round of 429s
    if result.answer is None:
        if token in ANSWERS:  # the first attempt's answer stands
            return [*decisions, f"→ {ANSWERS[token][0]}{ra}"]
        return [*decisions, "→ 502"]  # addons/recovery.py lets mitmproxy's own 502 through
    renamed = " renamed" if rename_back(result.candidate, result.answer.headers) != Rename.NONE else ""
    fallback = f" as {use.fallback_model}" if use.fallback_model else ""
    return [*decisions, f"→ {result.answer.status}{renamed}{fallback}{ra}"]


# fmt: off
MATRIX = [
    # name,                              groups,           fallback, script,                                   expected
    ("2xx",                              {"a": 1},         0, {},                                               "a1 200, answer, → 200"),
    ("400 is the request's own",         {"a": 2},         0, {"a1": ["400"]},                                  "a1 400, answer, → 400"),
    ("401 one key",                      {"a": 1},         0, {"a1": ["401"]},
     "a1 401, retry, wait a, leave a, → 503 no_upstream_key_available"),
    ("401 another key",                  {"a": 2},         0, {"a1": ["401"]},                                  "a1 401, retry, wait a, a2 200, → 200"),
    ("403 another key",                  {"a": 2},         0, {"a1": ["403"]},                                  "a1 403, retry, wait a, a2 200, → 200"),
    ("403 next group",                   {"a": 1, "b": 1}, 0, {"a1": ["403"]},
     "a1 403, retry, key a, leave a, wait b, b1 200, → 200"),
    # A round of 429s without Retry-After on every key of the last route: upstream's 429, with
    # keyrotor's Retry-After (when a key is back), not more rounds.
    ("429 no hint one key",              {"a": 1},         0, {"a1": ["429"]},                                  "a1 429, retry, → 429 retry-after 60"),
    ("429 no hint, a round of the pool", {"a": 3},         0, {"a1": ["429"], "a2": ["429"], "a3": ["429"]},
     "a1 429, retry, wait a, a2 429, wait a, a3 429, → 429 retry-after 60"),
    ("429 no hint, then the fallback",   {"a": 2},         1, {"a1": ["429"], "a2": ["429"]},
     "a1 429, retry, key a, a2 429, key a, leave a, wait f, f1 200, → 200 as gpt-4o-mini"),
    ("429 Retry-After one key waits",    {"a": 1},         0, {"a1": ["429+ra", "200"]},
     "a1 429+ra, retry, wait a, a1 200, → 200"),
    ("429 another key",                  {"a": 2},         0, {"a1": ["429"]},                                  "a1 429, retry, wait a, a2 200, → 200"),
    ("429 every key, every group",       {"a": 2, "b": 1}, 0, {"a1": ["429"], "a2": ["429"], "b1": ["429"]},
     "a1 429, retry, key a, a2 429, key a, leave a, wait b, b1 429, → 429 retry-after 60"),
    ("429 insufficient_quota",           {"a": 2},         0, {"a1": ["429quota"]},
     "a1 429quota, retry, wait a, a2 200, → 200"),
    ("429 quota everywhere",             {"a": 2},         0, {"a1": ["429quota"], "a2": ["429quota"]},
     "a1 429quota, retry, wait a, a2 429quota, wait a, leave a, → 503 no_upstream_key_available"),
    ("5xx one key, as upstream said",    {"a": 1},         0, {"a1": ["500"]},
     "a1 500, retry, wait a, a1 500, wait a, a1 500, leave a, → 500"),
    ("5xx another key",                  {"a": 2},         0, {"a1": ["500"]},                                  "a1 500, retry, wait a, a2 200, → 200"),
    ("5xx follows the request",          {"a": 2},         0, {"a1": ["500"], "a2": ["500"]},
     "a1 500, retry, wait a, a2 500, → 500"),
    ("5xx twice, the next group",        {"a": 2, "b": 1}, 0, {"a1": ["500"], "a2": ["500"]},
     "a1 500, retry, key a, a2 500, leave a, wait b, b1 200, → 200"),
    ("connection error, another key",    {"a": 2},         0, {"a1": ["refused"]},
     "a1 refused, retry, wait a, a2 200, → 200"),
    ("connection errors everywhere",     {"a": 2},         0, {"a1": ["refused"], "a2": ["refused"]},
     "a1 refused, retry, wait a, a2 refused, → 502"),
    ("timeout, another key",             {"a": 2},         0, {"a1": ["timeout"]},
     "a1 timeout, retry, wait a, a2 200, → 200"),
    ("timeout then 5xx: next group",     {"a": 2, "b": 1}, 0, {"a1": ["timeout"], "a2": ["500"]},
     "a1 timeout, retry, key a, a2 500, leave a, wait b, b1 200, → 200"),
    ("model missing in group",           {"a": 1, "b": 1}, 0, {"a1": ["404missing"]},
     "a1 404missing, next_group, leave a, wait b, b1 200, → 200"),
    ("model missing in the last group",  {"a": 1},         0, {"a1": ["404missing"]},                           "a1 404missing, answer, → 404"),
    ("model missing, then fallback",     {"a": 1},         1, {"a1": ["404missing"]},
     "a1 404missing, next_group, leave a, wait f, f1 200, → 200 as gpt-4o-mini"),
    ("invalid, then fallback model",     {"a": 1},         1, {"a1": ["401"]},
     "a1 401, retry, key a, leave a, wait f, f1 200, → 200 as gpt-4o-mini"),
    ("everything fails to the fallback", {"a": 2, "b": 1}, 2, {"a1": ["429"], "a2": ["401"], "b1": ["500"], "f1": ["500"]},
     "a1 429, retry, key a, a2 401, key a, leave a, key b, b1 500, key b, b1 500, key b, b1 500, leave b, wait f,"
     " f1 500, wait f, f2 200, → 200 as gpt-4o-mini"),
    ("an alias is renamed back",         {"a": 2},         0, {"a1": ["500"]},                                  "a1 500, retry, wait a, a2 200, → 200 renamed"),
    ("fallback refuses too",             {"a": 1},         1, {"a1": ["401"], "f1": ["401"]},
     "a1 401, retry, key a, leave a, wait f, f1 401, wait f, leave f, → 503 no_upstream_key_available"),
    # A fallback model served by the same group (a~: group a asked for the fallback) has attempts of its own.
    ("same group fallback after 503",    {"a": 2},         0, {"a1": ["503"], "a2": ["503"]},
     "a1 503, retry, key a, a2 503, leave a, wait a~, a1~ 200, → 200 as gpt-4o-mini"),
    ("same group fallback, one key",     {"a": 1},         0, {"a1": ["503"]},
     "a1 503, retry, key a, a1 503, key a, a1 503, leave a, wait a~, a1~ 200, → 200 as gpt-4o-mini"),
    ("same group fallback after errors", {"a": 2},         0, {"a1": ["refused"], "a2": ["refused"]},
     "a1 refused, retry, key a, a2 refused, leave a, wait a~, a1~ 200, → 200 as gpt-4o-mini"),
    ("same group fallback after 429s",   {"a": 2},         0, {"a1": ["429"], "a2": ["429"]},
     "a1 429, retry, key a, a2 429, key a, leave a, wait a~, a1~ 200, → 200 as gpt-4o-mini"),
    ("same group fallback fails too",    {"a": 2},         0, {"a1": ["503"], "a2": ["503"], "a1~": ["503"], "a2~": ["503"]},
     "a1 503, retry, key a, a2 503, leave a, wait a~, a1~ 503, wait a~, a2~ 503, → 503 as gpt-4o-mini"),
    # A prompt too long for the model goes to its fallback model (no other group of the model: same context).
    ("context length, the fallback",     {"a": 1, "b": 1}, 1, {"a1": ["400ctx"]},
     "a1 400ctx, next_model, leave a, leave b, wait f, f1 200, → 200 as gpt-4o-mini"),
    ("context length, same group",       {"a": 2},         0, {"a1": ["400ctx"]},
     "a1 400ctx, next_model, leave a, wait a~, a2~ 200, → 200 as gpt-4o-mini"),
    ("context length after a 5xx",       {"a": 2},         1, {"a1": ["500"], "a2": ["400ctx"]},
     "a1 500, retry, key a, a2 400ctx, leave a, wait f, f1 200, → 200 as gpt-4o-mini"),
    ("context length, no fallback",      {"a": 1, "b": 1}, 0, {"a1": ["400ctx"]},                           "a1 400ctx, answer, → 400"),
    ("context length, fallback too",     {"a": 1},         1, {"a1": ["400ctx"], "f1": ["400ctx"]},
     "a1 400ctx, next_model, leave a, wait f, f1 400ctx, → 400 as gpt-4o-mini"),
    # A model left silent at an upstream is silent on its other keys there: a route elsewhere goes next.
    ("timeout, the fallback",            {"a": 2},         1, {"a1": ["timeout"]},
     "a1 timeout, retry, leave a, wait f, f1 200, → 200 as gpt-4o-mini"),
    ("timeout, same group fallback",     {"a": 2},         0, {"a1": ["timeout"]},
     "a1 timeout, retry, leave a, wait a~, a2~ 200, → 200 as gpt-4o-mini"),
    ("retry timeout, the fallback",      {"a": 3},         1, {"a1": ["500"], "a2": ["timeout"]},
     "a1 500, retry, key a, a2 timeout, leave a, wait f, f1 200, → 200 as gpt-4o-mini"),
    ("other 400s never fall back",       {"a": 1},         1, {"a1": ["400filter"]},                        "a1 400filter, answer, → 400"),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "layout", "fallback", "script", "expected"),
    [pytest.param(*row, id=row[0]) for row in MATRIX],
)
def test_the_failover_matrix(name, layout, fallback, script, expected):
    alias = "gpt-4o-2024-08-06" if "alias" in name else None
    shared = "same group" in name
    assert ", ".join(asyncio.run(journey(World(layout, script, fallback, alias, shared=shared)))) == expected


# Right after a start no key is proven (upstream has not accepted it yet): its failures are the
# key's, not the request's, and the request goes on to a key not yet tried.
# fmt: off
NEW_KEYS = [
    # name,                              groups,   new keys,                   script,                                  expected
    ("5xx on two new keys",              {"a": 3}, {"a1", "a2"},               {"a1": ["500"], "a2": ["500"]},
     "a1 500, retry, wait a, a2 500, wait a, a3 200, → 200"),
    ("new keys beyond max_attempts",     {"a": 5}, {"a1", "a2", "a3", "a4"},   {"a1": ["401"], "a2": ["500"], "a3": ["500"]},
     "a1 401, retry, wait a, a2 500, wait a, a3 500, wait a, a4 200, → 200"),
    ("a new key, then a proven one",     {"a": 3}, {"a1"},                     {"a1": ["500"], "a2": ["500"]},
     "a1 500, retry, wait a, a2 500, wait a, a3 200, → 200"),
    ("two proven keys after a new one",  {"a": 3}, {"a1"},                     {"a1": ["500"], "a2": ["500"], "a3": ["500"]},
     "a1 500, retry, wait a, a2 500, wait a, a3 500, → 500"),
    ("every new key fails: max_attempts", {"a": 3}, {"a1", "a2", "a3"},         {"a1": ["500"], "a2": ["500"], "a3": ["500"]},
     "a1 500, retry, wait a, a2 500, wait a, a3 500, → 500"),  # every key had its turn: it followed the request
    ("one new key: max_attempts",        {"a": 1}, {"a1"},                     {"a1": ["500"]},
     "a1 500, retry, wait a, a1 500, wait a, a1 500, leave a, → 500"),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "layout", "new", "script", "expected"),
    [pytest.param(*row, id=row[0]) for row in NEW_KEYS],
)
def test_new_keys_failures_are_theirs(name, layout, new, script, expected):
    world = World(layout, script, unproven=frozenset(new))
    assert ", ".join(asyncio.run(journey(world))) == expected


def _failures(world: World) -> dict[str, int]:
    """Failures each key was blamed for (in the scope the journey used)."""
    counted = {}
    for rotation in world.rotations.values():
        for key_id, runtime in rotation.pool.runtime.items():
            counted[world.names[key_id]] = sum(h.failures for h in runtime.scopes.values())
    return counted


def test_a_new_keys_5xx_is_blamed_on_it_and_a_proven_ones_follows_the_request():
    world = World({"a": 3}, {"a1": ["500"], "a2": ["500"]}, unproven=frozenset({"a1", "a2"}))
    asyncio.run(journey(world))
    assert _failures(world) == {"a1": 1, "a2": 1, "a3": 0}  # both new keys' failures are theirs
    world = World({"a": 3}, {"a1": ["500"], "a2": ["500"], "a3": ["500"]}, unproven=frozenset({"a1"}))
    asyncio.run(journey(world))
    assert _failures(world) == {"a1": 1, "a2": 0, "a3": 0}  # then two proven keys: it followed the request


@pytest.mark.parametrize(
    ("alive_for", "expected"),
    [
        (0, "a1 429, retry, → 503 no_upstream_key_available"),  # gone before the first retry: no attempt
        (2, "a1 429, retry, wait a, a2 500, → 500"),  # gone after one retry: that answer stands
        (None, "a1 429, retry, wait a, a2 500, wait a, a3 200, → 200"),
    ],
    ids=["before the retry", "after one retry", "still waiting"],
)
def test_a_client_that_left_gets_no_more_attempts(alive_for, expected):
    world = World({"a": 3}, {"a1": ["429"], "a2": ["500"]})
    assert ", ".join(asyncio.run(journey(world, alive_for=alive_for))) == expected


def test_a_client_that_hung_up_releases_its_key_and_nothing_is_learnt():
    world = World({"a": 1}, {})
    assert asyncio.run(journey(world, client_leaves_first=True)) == ["a1 client", "release", "→ nobody"]
    key = world.rotations[1].pool.keys[0]
    assert key.state == KeyState.ACTIVE and world.rotations[1].pool.runtime[key.id].in_flight == 0


# A catch-all group d (an empty model list, like default/default) is present in every row: it serves
# only what no group lists, so MODEL's requests never reach it unless a fallback model is one of those.
# fmt: off
NEVER_DIVERTED = [
    # name,                            groups,   key states,            script,                     fallback, expected
    ("no key in the model's group",    {"a": 0}, {},                    {},                         False,
     "→ 503 no_upstream_key_configured"),
    ("only invalid keys",              {"a": 2}, {"a1": KeyState.INVALID, "a2": KeyState.INVALID}, {}, False,
     "→ 503 no_upstream_key_available"),
    ("only disabled keys",             {"a": 1}, {"a1": KeyState.DISABLED}, {},                     False,
     "→ 503 no_upstream_key_available"),
    ("keys turn out invalid",          {"a": 2}, {},                    {"a1": ["401"], "a2": ["401"]}, False,
     "a1 401, retry, wait a, a2 401, wait a, leave a, → 503 no_upstream_key_available"),
    # One round of 429s without Retry-After on every usable key: upstream's 429, with keyrotor's Retry-After.
    ("keys rate limited",              {"a": 1}, {},                    {"a1": ["429"]},            False,
     "a1 429, retry, → 429 retry-after 60"),
    ("5xx stays upstream's",           {"a": 2}, {},                    {"a1": ["500"], "a2": ["500"]}, False,
     "a1 500, retry, wait a, a2 500, → 500"),
    ("explicit fallback: no key",      {"a": 0}, {},                    {},                         True,
     "d1 200, answer, → 200"),
    ("explicit fallback: invalid",     {"a": 1}, {},                    {"a1": ["401"]},            True,
     "a1 401, retry, key a, leave a, wait d, d1 200, → 200 as gpt-4.1-nano"),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "layout", "states", "script", "unlisted_fallback", "expected"),
    [pytest.param(*row, id=row[0]) for row in NEVER_DIVERTED],
)
def test_a_model_some_group_lists_never_goes_to_a_catch_all(name, layout, states, script, unlisted_fallback, expected):
    world = World(layout, script, catch_all=1, unlisted_fallback=unlisted_fallback)
    for rotation in world.rotations.values():
        for key in rotation.pool.keys:
            key.state = states.get(world.names[key.id], key.state)
    assert ", ".join(asyncio.run(journey(world))) == expected


def test_no_key_at_all_refuses_before_any_attempt():
    world = World({"a": 1}, {})
    world.rotations[1].pool.keys[0].state = KeyState.INVALID
    assert asyncio.run(journey(world)) == ["→ 503 no_upstream_key_available"]


# --------------------------------------------------------------------------- the pure decisions


@pytest.mark.parametrize(
    ("token", "more_routes", "kind", "verdict"),
    [
        ("200", False, OutcomeKind.OK, Verdict.ANSWER),
        ("400", True, None, Verdict.ANSWER),
        ("401", False, OutcomeKind.INVALID, Verdict.RETRY),
        ("429", False, OutcomeKind.RATE_LIMITED, Verdict.RETRY),
        ("429quota", False, OutcomeKind.EXHAUSTED, Verdict.RETRY),
        ("500", False, OutcomeKind.SERVER_ERROR, Verdict.RETRY),
        ("404missing", True, None, Verdict.NEXT_GROUP),
        ("404missing", False, None, Verdict.ANSWER),
        ("400ctx", True, None, Verdict.NEXT_MODEL),  # a fallback model may take a longer prompt
        ("400ctx", False, None, Verdict.ANSWER),  # another group of the same model has the same context
        ("400filter", True, None, Verdict.ANSWER),
    ],
)
def test_judge_classifies_an_answer(token, more_routes, kind, verdict):
    status, headers, content = ANSWERS[token]
    judgement = judge(status, httpx.Headers(headers), content, more_routes, time.time(), fallback=more_routes)
    assert (judgement.outcome.kind if judgement.outcome else None, judgement.verdict) == (kind, verdict)
    assert judgement.missing == (verdict == Verdict.NEXT_GROUP)


RETRYABLE = Judgement(Outcome(OutcomeKind.INVALID, "401"), False, Verdict.RETRY)
MISSING = Judgement(None, True, Verdict.NEXT_GROUP)


@pytest.mark.parametrize(
    ("judgement", "reached", "websocket", "verdict"),
    [
        (Judgement(OK, False, Verdict.ANSWER), True, True, Verdict.ANSWER),
        (RETRYABLE, False, False, Verdict.RETRY),
        (RETRYABLE, True, False, Verdict.ANSWER),  # already on its way to the client
        (RETRYABLE, False, True, Verdict.REFUSE),  # a WebSocket upgrade: our own 503
        (MISSING, True, False, Verdict.NEXT_GROUP),
        (MISSING, False, True, Verdict.REFUSE),
        (Judgement(None, False, Verdict.NEXT_MODEL), False, False, Verdict.NEXT_MODEL),
        (Judgement(None, False, Verdict.NEXT_MODEL), False, True, Verdict.ANSWER),  # no key's fault: upstream's 400
    ],
)
def test_after_an_answer(judgement, reached, websocket, verdict):
    assert after_answer(judgement, lambda: reached, lambda: websocket) == verdict


@pytest.mark.parametrize(
    ("message", "reached", "websocket", "verdict"),
    [
        ("Client disconnected.", False, False, Verdict.RELEASE),
        ("upstream timed out: nothing for 30 s", False, False, Verdict.RETRY),
        ("Server disconnected.", True, False, Verdict.ANSWER),  # too late to retry
        ("Server disconnected.", False, True, Verdict.ANSWER),
    ],
)
def test_after_an_error(message, reached, websocket, verdict):
    assert after_error(message, lambda: reached, lambda: websocket) == verdict


def test_route_refuses_a_model_nothing_serves_and_keeps_a_clients_groups():
    groups = [Group(1, UPSTREAM, "a", 2, models={MODEL: None}), Group(2, UPSTREAM, "b", 1, models={MODEL: None})]
    table = RouteTable(groups)
    error = route(table, "unknown", None)
    assert not isinstance(error, list) and (error.status, error.code) == (404, "model_not_found")
    routes = route(table, MODEL, ["up/b"])
    assert isinstance(routes, list) and [c.group.name for c in routes] == ["b"]
    refused = route(table, MODEL, ["up/c"])
    assert not isinstance(refused, list) and refused.code == "model_not_found"


def test_route_refuses_a_model_whose_listing_groups_are_all_disabled():
    off = Group(1, UPSTREAM, "a", models={MODEL: None}, enabled=False)
    table = RouteTable([off, Group(2, UPSTREAM, "d")])  # d, a catch-all, does not take MODEL's requests
    refused = route(table, MODEL, None)
    assert not isinstance(refused, list) and (refused.status, refused.code) == (503, "no_upstream_group")
    assert MODEL in refused.message and refused.headers == {"x-should-retry": "false"}
    routes = route(table, "unknown", None)
    assert isinstance(routes, list) and [c.group.name for c in routes] == ["d"]


@pytest.mark.parametrize(
    ("candidate", "content_type", "rename"),
    [
        (None, "application/json", Rename.NONE),
        (Candidate(Group(1, UPSTREAM, "a"), MODEL, MODEL), "application/json", Rename.NONE),
        (Candidate(Group(1, UPSTREAM, "a"), MODEL, "gpt-4o-2024"), "application/json", Rename.WHOLE),
        (Candidate(Group(1, UPSTREAM, "a"), FALLBACK, FALLBACK, fallback_from=MODEL), "text/event-stream", Rename.NONE),
        (Candidate(Group(1, UPSTREAM, "a"), MODEL, "gpt-4o-2024"), "text/event-stream", Rename.EVENTS),
    ],
)
def test_rename_back(candidate, content_type, rename):
    assert rename_back(candidate, httpx.Headers({"content-type": content_type})) == rename


@pytest.mark.parametrize(
    ("candidate", "renamed"),
    [
        (None, MODEL),
        (Candidate(Group(1, UPSTREAM, "a"), MODEL, "gpt-4o-2024"), MODEL),  # an alias: the client's name again
        (Candidate(Group(1, UPSTREAM, "a"), FALLBACK, FALLBACK, fallback_from=MODEL), FALLBACK),
    ],
)
def test_an_answer_names_the_model_the_client_knows(candidate, renamed):
    upstream_name = candidate.upstream_model if candidate else MODEL
    body = json.dumps({"model": upstream_name, "choices": []}).encode()
    assert json.loads(renamed_back(candidate, body)) == {"model": renamed, "choices": []}


def _journey(groups: int, attempts: list[tuple[int, int, int | None]], answered: Outcome | None) -> Journey:
    """A journey after `attempts` (group id, key id, status), on routes of groups 1…`groups`."""
    candidates = [Candidate(Group(g, UPSTREAM, f"g{g}"), MODEL, MODEL) for g in range(1, groups + 1)]
    plan = Plan(candidates, ClientRequest("POST", "/v1/chat/completions", (), b"{}", MODEL))
    use = KeyUse(attempts=[AttemptLog(n, k, 0.0, s, group_id=g) for n, (g, k, s) in enumerate(attempts, 1)])
    use.candidate = candidates.index(next(c for c in candidates if c.group.id == attempts[-1][0]))
    pools: dict[int, Rotation] = {g: Rotation() for g in range(1, groups + 1)}
    return Journey(plan, use, SETTINGS, pools.get, answered)


def _moves(steps) -> list[str]:
    return [str(step) for step in steps]


@pytest.mark.parametrize(
    ("groups", "attempts", "expected"),
    [
        (2, [(1, 1, 401)], ["take_key 0 exclude=1"]),
        (1, [(1, 1, 429)], ["take_key 0 wait exclude="]),  # a rate limit ends: the same key may come back
        (2, [(1, 1, 500), (1, 2, 502)], ["leave 0", "take_key 1 wait exclude="]),
        (1, [(1, 1, 500), (1, 2, None)], ["stop 0"]),  # it followed the request: upstream's answer stands
        (2, [(1, 1, 401), (1, 2, 401), (1, 3, 401)], ["leave 0", "take_key 1 wait exclude="]),  # max_attempts
    ],
)
def test_where_a_journey_goes_next(groups, attempts, expected):
    journey_ = _journey(groups, attempts, Outcome(OutcomeKind.INVALID))
    step = journey_.start(False, True)
    steps = [step]
    if step.move == Move.LEAVE:
        steps.append(journey_.next(True))
    described = [
        f"{s}" + (f" exclude={','.join(map(str, sorted(s.exclude)))}" if s.move == Move.TAKE_KEY else "") for s in steps
    ]
    assert described == expected


def test_a_journey_ends_refusing_only_for_our_keys():
    journey_ = _journey(1, [(1, 1, 429)], Outcome(OutcomeKind.RATE_LIMITED))
    assert journey_.took(None, True).move == Move.LEAVE
    assert journey_.next(True).move == Move.STOP
    assert journey_.end() is True and journey_.use.settled
    served = _journey(1, [(1, 1, 500)], Outcome(OutcomeKind.SERVER_ERROR))
    assert served.end() is False  # upstream's own words go to the client


def test_a_client_gone_while_waiting_stops_the_journey():
    journey_ = _journey(1, [(1, 1, 429)], Outcome(OutcomeKind.RATE_LIMITED))
    journey_.start(False, True)
    key = PoolKey(2, "sk-2", "0002", KeyState.ACTIVE, None, None, 1.0, 0)
    assert journey_.took(key, alive=False).move == Move.STOP
    assert _moves(journey_.trail) == ["take_key 0 wait", "stop 0"]


def test_owner_and_first_key_refusals():
    world = World({"a": 1}, {})
    plan = Plan(world.table.candidates(MODEL), ClientRequest("POST", "/v1/chat/completions", (), b"{}", MODEL))
    plan.only_key = 99
    assert first_key_now(plan, world.rotations.get) is None
    error = no_first_key(plan, world.rotations, ("file_1",))
    assert (error.status, error.code) == (409, "object_owner_unavailable")


# --------------------------------------------------------------------------- waiting for a key


def _rotation(*states: KeyState, proven: bool = True) -> Rotation:
    pool = Pool()
    pool.replace_keys(
        [PoolKey(i, f"sk-{i}", f"000{i}", state, None, None, 1.0, 0) for i, state in enumerate(states, 1)]
    )
    for runtime in pool.runtime.values():
        runtime.proven = proven
    rotation = Rotation(pool)
    rotation.configure(SETTINGS)
    return rotation


NOW = 1_800_000_000.0


def test_wait_for_a_cooling_key_only_when_it_is_back_before_the_deadline():
    rotation = _rotation(KeyState.COOLING)
    rotation.pool.keys[0].cooldown_until = NOW + 0.5
    assert rotation.waiting(frozenset(), NOW + 1, MODEL, None, NOW) == KeyWait(seconds=0.5)
    assert rotation.waiting(frozenset(), NOW + 0.2, MODEL, None, NOW) == KeyWait()  # give up: a 503 now


def test_a_key_awaiting_its_first_answer_is_waited_for_then_shared_at_the_deadline():
    rotation = _rotation(KeyState.ACTIVE, proven=False)
    key = rotation.pool.keys[0]
    rotation.pool.started(key, NOW)
    assert rotation.waiting(frozenset(), NOW + 1, MODEL, None, NOW) == KeyWait(seconds=PROOF_POLL_SECONDS)
    assert rotation.waiting(frozenset(), NOW + 0.01, MODEL, None, NOW) == KeyWait(key)


def test_a_new_key_resting_for_the_model_is_not_waited_for():
    # A provider's outage right after a start: the new key's answer would not free it for this
    # model, so the request does not wait out wait_max_seconds for it (it did: 5 s per request).
    rotation = _rotation(KeyState.ACTIVE, proven=False)
    key = rotation.pool.keys[0]
    rotation.pool.started(key, NOW)
    rotation.pool.runtime[key.id].health(MODEL).resting_until = NOW + 60
    assert not rotation.pool.awaiting_proof(frozenset(), MODEL, NOW)
    assert rotation.pool.awaiting_proof(frozenset(), None, NOW)  # key-wide it still awaits its answer
    assert rotation.waiting(frozenset(), NOW + 1, MODEL, None, NOW) != KeyWait(seconds=PROOF_POLL_SECONDS)


def test_a_resting_pool_with_a_probe_out_is_looked_at_again_soon():
    rotation = _rotation(KeyState.ACTIVE, KeyState.ACTIVE)
    for _ in range(SETTINGS.policy.failure_threshold):
        rotation.pool.upstream_trouble(MODEL, NOW, "503 server_error")
    assert rotation.waiting(frozenset(), NOW + 1, MODEL, None, NOW) == KeyWait(seconds=PROBE_POLL_SECONDS)
    assert rotation.waiting(frozenset(), NOW, MODEL, None, NOW) == KeyWait()


def test_keys_only_an_admin_can_bring_back_are_not_waited_for():
    rotation = _rotation(KeyState.INVALID, KeyState.EXHAUSTED)
    assert rotation.waiting(frozenset(), NOW + 60, MODEL, None, NOW) == KeyWait()


@pytest.mark.parametrize(
    ("asked", "upstream_model", "dialect", "renamed", "body_model"),
    [
        (MODEL, MODEL, Dialect.OPENAI, None, MODEL),
        (MODEL, "gpt-4o-2024-08-06", Dialect.OPENAI, "gpt-4o-2024-08-06", "gpt-4o-2024-08-06"),
        (MODEL, "my-deployment", Dialect.AZURE, None, MODEL),  # Azure names its deployment in the URL
        (None, None, Dialect.OPENAI, None, None),
    ],
)
def test_the_first_attempt_names_the_upstreams_model(asked, upstream_model, dialect, renamed, body_model):
    group = Group(1, Upstream(1, "up", "http://up.test", dialect), "a")
    plan = Plan([], ClientRequest("POST", "/v1/chat/completions", (), b"{}", asked))
    assert plan.renamed_first(Candidate(group, asked, upstream_model)) == renamed
    assert plan.body_model == body_model


def test_a_retry_renames_the_top_level_model_not_a_decoy():
    group = Group(1, Upstream(1, "relay", "http://relay.test"), "a", models={"cheap": "gpt-4o-mini"})
    body = b'{"metadata": {"model": "cheap"}, "model": "cheap"}'
    plan = Plan([], ClientRequest("POST", "/v1/chat/completions", (), body, "cheap"))
    key = PoolKey(1, "sk-x", "sk-x", KeyState.ACTIVE, None, None, 1.0, 0)
    sent = addressed(plan, Candidate(group, "cheap", "gpt-4o-mini"), key, "http://unused")
    assert sent.body == b'{"metadata": {"model": "cheap"}, "model": "gpt-4o-mini"}'


@pytest.mark.parametrize("tripped", [False, True], ids=["pool serving", "pool resting for the model"])
def test_a_5xx_while_upstream_fails_the_model_on_every_key_is_answered_not_waited_on(tripped):
    # Right after a start (no key proven), a provider's outage: once the pool rests for the model,
    # waiting for its probe held every client until the probe failed (0.8, 1.8, 3.8 s ...).
    rotation = _rotation(KeyState.ACTIVE, KeyState.ACTIVE, KeyState.ACTIVE, proven=False)
    if tripped:
        for _ in range(SETTINGS.policy.failure_threshold):
            rotation.pool.upstream_trouble(MODEL, time.time(), "503 server_error")
        assert rotation.pool.resting(MODEL, time.time()) is not None
    candidate = Candidate(Group(1, UPSTREAM, "g1"), MODEL, MODEL)
    plan = Plan([candidate], ClientRequest("POST", "/v1/chat/completions", (), b"{}", MODEL))
    use = KeyUse(attempts=[AttemptLog(1, 1, 0.0, 503, group_id=1)])
    use.candidate = 0
    step = Journey(plan, use, SETTINGS, {1: rotation}.get, Outcome(OutcomeKind.INVALID)).start(False, True)
    assert str(step) == ("stop 0" if tripped else "take_key 0 wait")
