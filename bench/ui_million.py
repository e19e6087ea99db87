"""The monitor UI at a million flows: page and JSON latency, and capture while the UI is queried.

    .venv/bin/python bench/ui_million.py [--rows 1000000] [--requests 200] [--db PATH] [--json out.json]

1. Generation: a fresh database (storage.db.ensure_database) in a temp directory, or --db PATH
   (reused as it is when it already holds flows, so a second run skips this step). N realistic
   flows go in through storage.flows.insert_batch and storage.rollups.add_records, 5,000 per
   transaction: the capture writer's own calls, so the FTS5 triggers, the per-key counters and
   the rollups do their real work. Seeded: the same --seed gives the same database.
2. UI latency: the real UI (`run.py ui`) on that database; every case is R requests one after
   the other (after a warm-up), p50/p95/max, compared with the issue's targets: flows list and
   its JSON twin p95 < 150 ms, full-text search < 300 ms, dashboard < 200 ms, flow detail < 50 ms.
3. Capture under UI load: the fake upstream and the real proxy (`run.py proxy`) on the SAME
   database, driven at saturation (c=32, non-streamed chat) without and then with a UI query
   loop in another process: proxy req/s, whether the flows table grew by exactly the number of
   requests, the writer's lag (last response to last row visible), UI p95 during the load.

Exit status: 0 every target met and capture kept up, 3 a target missed or capture fell behind,
1 a request failed or a process did not start, 130 interrupted. Every process it starts is
stopped in every case. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import accumulate
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from proxy_overhead import (
    ADMIN_KEY,
    HOST,
    KEEPALIVE_EXPIRY,
    PYTHON,
    ROOT,
    RUN_PY,
    BenchError,
    Environment,
    Load,
    Target,
    check_ranges,
    cpu_seconds,
    fmt,
    free_port,
    log_tail,
    ms,
    percentile,
    run_facts,
    settle,
    start_upstream,
    stop_on_sigterm,
    wait_for_port,
)

from core.prices import load_prices
from core.records import AttemptLog, FlowRecord
from storage import client_keys, db, flows, outcomes, rollups, upstream_keys
from storage.secrets import key_cipher
from storage.upstream_keys import SqliteKeyStore
from usecases.keys import add_keys

# The targets, p95 in ms, per kind of page.
TARGETS_MS = {"list": 150.0, "search": 300.0, "dashboard": 200.0, "detail": 50.0}
CAPTURE_LAG_LIMIT_S = 1.0  # "keeps up": every row written, the last within this long after the last response

# --------------------------------------------------------------------------- what the flows look like

SPAN_SECONDS = 30 * 86400  # the flows' start times spread over the last 30 days
UPSTREAM_KEY_COUNT = 20
CLIENT_NAMES = (
    "web-app",
    "mobile-app",
    "batch-jobs",
    "support-bot",
    "search-indexer",
    "analytics",
    "staging",
    "ci-tests",
    "data-science",
    "partner-acme",
)
CLIENT_WEIGHTS = (30, 18, 14, 10, 8, 6, 5, 4, 3, 2)
# (model, kind, share): chat completions, embeddings, and GET /v1/models (no model).
MODELS = (
    ("gpt-4o-mini", "chat", 40),
    ("gpt-4o", "chat", 18),
    ("o3-mini", "chat", 10),
    ("gpt-4.1-mini", "chat", 9),
    ("gpt-4.1", "chat", 5),
    ("gpt-3.5-turbo", "chat", 4),
    ("text-embedding-3-small", "embedding", 9),
    ("text-embedding-3-large", "embedding", 2),
    ("gpt-4-turbo", "chat", 0.2),
    (None, "models", 0.5),
)
SNAPSHOTS = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "o3-mini": "o3-mini-2025-01-31",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
    "gpt-4-turbo": "gpt-4-turbo-2024-04-09",
}
STREAM_SHARE_OF_CHAT = 0.36  # chat is ~86 % of flows: ~31 % of all flows are streamed
# Final status of a flow; None: no response at all (connection error), with an error message.
STATUSES = ((200, 93.0), (429, 2.5), (401, 1.0), (500, 1.5), (503, 0.5), (400, 0.5), (None, 1.0))
RETRIED_SHARE = 0.03  # successful flows that needed a second or third attempt
CONNECTION_ERRORS = (
    "Server connection to ('api.openai.com', 443) failed: timed out",
    "Client disconnected.",
    "peer closed connection without sending complete message body (incomplete chunked read)",
    "Connection killed.",
)
ERROR_BODIES = {
    429: {
        "message": "Rate limit reached for {model} in organization org-xxx on requests per min (RPM): Limit 500,"
        " Used 500, Requested 1. Please try again in 120ms.",
        "type": "requests",
        "code": "rate_limit_exceeded",
    },
    401: {
        "message": "Incorrect API key provided: sk-proj-********************************Ab3x. You can find your"
        " API key at https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    },
    500: {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "code": None,
    },
    503: {
        "message": "No upstream key is available right now; try again after the Retry-After delay.",
        "type": "server_error",
        "code": "no_upstream_key",
    },
    400: {
        "message": "Invalid 'messages[1].content': string too long. Expected a string with maximum length"
        " 1048576, but got a string with length 1200000 instead.",
        "type": "invalid_request_error",
        "code": "string_above_max_length",
    },
}
USER_AGENTS = ("OpenAI/Python 1.54.3", "OpenAI/Python 1.82.0", "OpenAI/JS 4.73.0", "curl/8.5.0", "langchain/0.3.7")

# Words in rough order of frequency; drawn with Zipf weights, so a few are in nearly every body.
VOCABULARY = """
the of and to a in is it you that for on are with as this be at have from or by not but what we can
your all there when will if an about which do their how please data report customer order summary
explain code function error user request response table query list email draft translate review
improve product feature release meeting schedule budget revenue quarter analysis chart metric account
payment support ticket issue bug test deploy server database document contract policy price market
sales team project plan goal task status update version question answer example format text file
line value result output input step reason one time up out them then so some her would make like him
into has look two more write go see number no way could people my than first been call who its now
find long down day did get come made may part over new sound take only little work know place year
live me back give most very after thing our just name good sentence man think say great where help
through much before move right boy old too same tell does set three want air well also play small end
put home read hand port large spell add even land here must big high such follow act why ask men
change went light kind off need house picture try us again animal point mother world near build self
earth father head stand own page should country found school grow study still learn plant cover food
sun four between state keep eye never last let thought city tree cross farm hard start might story saw
far sea draw left late run while press close night real life few north open seem together next white
children begin got walk paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain stop once base hear
horse cut sure watch color face wood main enough plain girl usual young ready above ever red list
though feel talk bird soon body dog family direct pose leave song measure door black short numeral
class wind happen complete ship area half rock fire south problem piece told knew pass since top whole
king space heard best hour better true during hundred five remember early hold west ground interest
reach fast verb sing listen six travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold notice voice
unit power town fine certain fly fall lead cry dark machine note wait figure star box noun field rest
correct able pound done beauty drive stood contain front teach week final gave green oh quick develop
ocean warm free minute strong special mind behind clear tail produce fact street inch multiply nothing
course stay wheel full force blue object decide surface deep moon island foot system busy record boat
common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss
brought heat snow tire bring yes distant fill east paint language among
""".split()
# Each flow gets one of these with probability UNCOMMON_SHARE: every word is in ~0.3 % of flows.
UNCOMMON = """
kubernetes terraform photosynthesis mitochondria renaissance baroque cryptocurrency hydraulic turbine
thermodynamics archaeology glacier volcano tectonic savanna monsoon porcelain tapestry sonnet haiku
limerick manuscript parchment telescope nebula quasar asteroid comet meteorite galaxy satellite antenna
microwave semiconductor transistor capacitor resistor oscillator amplifier firmware bootloader compiler
interpreter debugger profiler mutex semaphore deadlock throughput bandwidth checksum encryption
certificate firewall subnet gateway failover replica shard partition ledger audit compliance statute
tribunal plaintiff defendant subpoena affidavit mortgage annuity dividend equity derivative arbitrage
liquidity solvency actuary underwriter reinsurance amortization depreciation
""".split()
UNCOMMON_SHARE = 0.25
# Each flow gets one of these with probability RARE_SHARE: every word is in ~30 of a million flows.
RARE = """
quokka zeppelin marmalade obsidian saxophone tarantula kaleidoscope narwhal chrysanthemum periwinkle
gazpacho origami tamarind baobab axolotl pangolin sassafras zucchini wombat xylograph
""".split()
RARE_SHARE = 0.0006
ABSENT = "xylophonist"  # in no flow: a search with no match
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in at most three sentences.",
    "You are a senior engineer reviewing code. Point out bugs first, then style.",
    "You translate the user's text into French, keeping the formatting.",
    "You are a support agent for an online shop. Be polite and specific.",
    "Extract the fields name, date and amount from the text and answer with JSON only.",
    "You summarise documents for busy executives: bullet points, no more than ten.",
    "You are a data analyst. Explain the numbers and what they imply.",
)
# Applications repeat a long system prompt, and often tool definitions, in every request: each
# client key is one application, which sends its own in APP_PROMPT_SHARE of its chat requests
# (the rest carry a short prompt above). Made from the seeded text, so the same --seed gives them.
APP_PROMPT_SHARE = 0.7
APP_PROMPT_CHARS = (600, 1800)
TOOL_NAMES = ("search_orders", "get_customer", "create_ticket", "lookup_price", "send_email", "run_query")
assert not (set(VOCABULARY) & set(UNCOMMON)) and not (set(VOCABULARY + UNCOMMON) & set(RARE))
assert ABSENT not in VOCABULARY + UNCOMMON + RARE


class FlowFactory:
    """Makes one realistic flow row (the dict the capture writer inserts) at a time, from a seeded RNG."""

    SENTENCES = 50_000

    def __init__(self, rng: random.Random, key_ids: list[int], client_ids: list[int]) -> None:
        self.rng = rng
        self.key_ids = key_ids
        self.client_ids = client_ids
        self.prices = load_prices(ROOT / "prices.toml")
        weights = list(accumulate(1 / (rank + 2.7) for rank in range(len(VOCABULARY))))  # Zipf-Mandelbrot
        self.sentences = []
        for _ in range(self.SENTENCES):
            words = rng.choices(VOCABULARY, cum_weights=weights, k=rng.randint(5, 18))
            if rng.random() < 0.3:
                words[rng.randrange(1, len(words))] += ","
            self.sentences.append(words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".....?!"))
        self.average_sentence = sum(len(s) + 1 for s in self.sentences) / len(self.sentences)
        # One long system prompt per application (client key); every other one also sends tools.
        self.app_prompts = {cid: self.text(rng.randint(*APP_PROMPT_CHARS)) for cid in client_ids}
        self.app_tools = {cid: self._tools() for cid in client_ids[::2]}
        self.models = [m for m in MODELS]
        self.model_weights = list(accumulate(m[2] for m in MODELS))
        self.status_weights = list(accumulate(s[1] for s in STATUSES))
        self.client_weights = list(accumulate(CLIENT_WEIGHTS[: len(client_ids)]))
        self.models_body = json.dumps(
            {
                "object": "list",
                "data": [
                    {"id": snap, "object": "model", "created": 1721172741, "owned_by": "system"}
                    for snap in [*SNAPSHOTS.values(), "text-embedding-3-small"]
                ],
            }
        )

    # ----------------------------------------------------------------- text

    def text(self, size: int) -> str:
        """English-like text of about `size` characters, cut at a word."""
        count = max(1, int(size / self.average_sentence) + 1)
        text = " ".join(self.rng.choices(self.sentences, k=count))
        if len(text) > size:
            cut = text.rfind(" ", 0, size)
            text = text[: cut if cut > 0 else size]
        return text

    def sprinkle(self, text: str, word: str) -> str:
        position = text.find(" ", self.rng.randrange(len(text))) if text else -1
        return f"{text} {word}" if position < 0 else f"{text[:position]} {word}{text[position:]}"

    def _tools(self) -> list[dict[str, Any]]:
        """Function definitions as an application sends them: 2-4 tools, each with a few parameters."""
        rng = self.rng
        tools = []
        for name in rng.sample(TOOL_NAMES, rng.randint(2, 4)):
            parameters = {
                word: {"type": rng.choice(("string", "integer", "boolean")), "description": self.text(60)}
                for word in dict.fromkeys(self.text(40).lower().replace(",", "").rstrip(".?!").split()[:4])
            }
            tools.append(
                {
                    "type": "function",
                    "function": {
                        "name": name,
                        "description": self.text(rng.randint(80, 200)),
                        "parameters": {"type": "object", "properties": parameters, "required": list(parameters)[:1]},
                    },
                }
            )
        return tools

    # ----------------------------------------------------------------- one flow

    def row(self, started_at: float) -> FlowRecord:
        rng = self.rng
        model, kind, _ = rng.choices(self.models, cum_weights=self.model_weights)[0]
        status = rng.choices(STATUSES, cum_weights=self.status_weights)[0][0]
        stream = kind == "chat" and rng.random() < STREAM_SHARE_OF_CHAT
        client_id = rng.choices(self.client_ids, cum_weights=self.client_weights)[0]
        key_id = rng.choice(self.key_ids)
        extra_words = []
        if rng.random() < UNCOMMON_SHARE:
            extra_words.append(rng.choice(UNCOMMON))
        if rng.random() < RARE_SHARE:
            extra_words.append(rng.choice(RARE))

        request_text, request_body, path, method = "", None, "/v1/models", "GET"
        if kind == "chat":
            path, method = "/v1/chat/completions", "POST"
            system, tools = rng.choice(SYSTEM_PROMPTS), None
            if rng.random() < APP_PROMPT_SHARE:
                system, tools = self.app_prompts[client_id], self.app_tools.get(client_id)
            # The body stays 1-4 KB: what the application adds comes off the user's part.
            shared = len(system) + (len(json.dumps(tools)) if tools else 0)
            request_text = self.text(rng.randint(max(300, 900 - shared), max(400, 3800 - shared)))
            for word in extra_words:
                request_text = self.sprinkle(request_text, word)
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": request_text}],
            }
            if tools:
                body["tools"] = tools
            if rng.random() < 0.5:
                body["temperature"] = round(rng.random(), 1)
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            request_body = json.dumps(body)
        elif kind == "embedding":
            path, method = "/v1/embeddings", "POST"
            request_text = self.text(rng.randint(900, 3900))
            for word in extra_words:
                request_text = self.sprinkle(request_text, word)
            request_body = json.dumps({"input": request_text, "model": model, "encoding_format": "base64"})

        duration = self._duration(kind, model, stream, status)
        first_byte = None if status is None else duration * (rng.uniform(0.1, 0.5) if stream else 0.97)
        prompt_tokens = completion_tokens = None
        response_body, chunk_times, response_type = None, None, "application/json"
        if status == 200:
            prompt_tokens = len(request_text) // 4 + (20 if kind == "chat" else 0) if kind != "models" else None
            if kind == "chat":
                response_body, chunk_times, completion_tokens = self._chat_response(
                    model, stream, prompt_tokens, started_at, first_byte, duration
                )
                response_type = "text/event-stream; charset=utf-8" if stream else response_type
            elif kind == "embedding":
                response_body = json.dumps(
                    {
                        "object": "list",
                        "model": model,
                        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                        "data": [
                            {
                                "object": "embedding",
                                "index": 0,
                                "embedding": base64.b64encode(rng.randbytes(rng.randint(750, 2900))).decode(),
                            }
                        ],
                    }
                )
            else:
                response_body = self.models_body
        elif status is not None:
            error = dict(ERROR_BODIES[status])
            error["message"] = error["message"].format(model=model or "gpt-4o-mini")
            response_body = json.dumps({"error": error})

        attempt_rows: list[AttemptLog] = []
        attempts = 1
        if (status == 200 and rng.random() < RETRIED_SHARE) or (status in (429, 500) and rng.random() < 0.5):
            attempts = rng.choice((2, 2, 3)) if status == 200 else 3
            at = started_at
            others = rng.sample([k for k in self.key_ids if k != key_id], attempts - 1)
            for number, other in enumerate(others, start=1):
                failed = rng.choice((429, 500, None))
                spent = rng.uniform(0.05, 0.9)
                attempt_rows.append(
                    AttemptLog(
                        attempt=number,
                        key_id=other,
                        status=failed,
                        started_at=at,
                        error=CONNECTION_ERRORS[0] if failed is None else None,
                        duration_ms=round(spent * 1000, 3),
                    )
                )
                at += spent
            attempt_rows.append(
                AttemptLog(
                    attempt=attempts,
                    key_id=key_id,
                    status=status,
                    started_at=at,
                    duration_ms=round((started_at + duration - at) * 1000, 3),
                )
            )

        total_tokens = None if prompt_tokens is None else prompt_tokens + (completion_tokens or 0)
        request_headers = [
            ["host", "api.openai.com"],
            ["authorization", "[redacted]"],
            ["content-type", "application/json"],
            ["user-agent", rng.choice(USER_AGENTS)],
            ["accept", "application/json"],
            ["content-length", str(len(request_body or ""))],
            ["x-stainless-retry-count", "0"],
        ]
        if method == "GET":
            request_headers = [h for h in request_headers if h[0] not in ("content-type", "content-length")]
        response_headers = (
            []
            if status is None
            else [
                ["date", datetime.fromtimestamp(started_at + duration, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")],
                ["content-type", response_type],
                ["openai-processing-ms", str(int(duration * 900))],
                ["openai-version", "2020-10-01"],
                ["x-request-id", f"req_{rng.getrandbits(128):032x}"],
                ["x-ratelimit-remaining-requests", str(rng.randint(0, 9999))],
                ["x-ratelimit-reset-requests", f"{rng.randint(1, 900)}ms"],
            ]
        )
        return FlowRecord(
            flow_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            started_at=started_at,
            first_byte_at=None if first_byte is None else started_at + first_byte,
            ended_at=started_at + duration,
            duration_ms=round(duration * 1000, 3),
            method=method,
            path=path,
            status=status,
            model=model,
            stream=stream,
            client_key_id=client_id,
            upstream_key_id=key_id,
            attempts=attempts,
            attempt_log=attempt_rows,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=total_tokens,
            cost=self.prices.cost(model, prompt_tokens, completion_tokens),
            client_addr=f"10.0.{client_id}.{rng.randint(2, 40)}",
            error=rng.choice(CONNECTION_ERRORS) if status is None else None,
            request_headers=request_headers,
            response_headers=response_headers,
            request_body=request_body,
            request_body_size=len(request_body.encode()) if request_body else 0,
            response_body=response_body,
            response_body_size=len(response_body.encode()) if response_body else 0,
            chunk_times=chunk_times,
        )

    def _duration(self, kind: str, model: str | None, stream: bool, status: int | None) -> float:
        rng = self.rng
        if status is None:
            return rng.uniform(0.5, 30.0)
        if status != 200:
            return rng.lognormvariate(-1.6 if status < 500 else -0.3, 0.5)
        if kind == "embedding":
            return rng.lognormvariate(-1.7, 0.4)
        if kind == "models":
            return rng.lognormvariate(-2.4, 0.3)
        seconds = rng.lognormvariate(0.3 if stream else 0.2, 0.6)
        return seconds * (3 if model == "o3-mini" else 1)

    def _chat_response(
        self, model: str, stream: bool, prompt_tokens: int, started_at: float, first_byte: float, duration: float
    ) -> tuple[str, list | None, int]:
        rng = self.rng
        snapshot = SNAPSHOTS.get(model, model)
        completion_id = f"chatcmpl-{rng.getrandbits(120):030x}"
        created = int(started_at)
        if not stream:
            content = self.text(rng.randint(700, 3500))
            completion_tokens = len(content) // 4
            return (
                json.dumps(
                    {
                        "id": completion_id,
                        "object": "chat.completion",
                        "created": created,
                        "model": snapshot,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content, "refusal": None},
                                "logprobs": None,
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens,
                        },
                        "system_fingerprint": "fp_0ba0d124f1",
                    }
                ),
                None,
                completion_tokens,
            )
        # A streamed body is mostly event framing: about a third of its 1-4 KB is text.
        words = self.text(rng.randint(50, 250)).split(" ")
        head = (
            f'data: {{"id":"{completion_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":"{snapshot}","system_fingerprint":"fp_0ba0d124f1","choices":'
        )
        events = [head + '[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n']
        position = 0
        while position < len(words):
            step = rng.randint(3, 9)
            piece = " " + " ".join(words[position : position + step])
            events.append(
                head + '[{"index":0,"delta":{"content":' + json.dumps(piece) + '},"finish_reason":null}]}\n\n'
            )
            position += step
        events.append(head + '[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
        completion_tokens = sum(len(w) + 1 for w in words) // 4
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        events.append(head + "[]," + f'"usage":{json.dumps(usage)}}}\n\n')
        events.append("data: [DONE]\n\n")
        # Reads as the tee saw them: one to three events each, spread from first byte to end.
        chunk_times, index, spread = [], 0, max(duration - first_byte, 0.01) * 1000
        while index < len(events):
            take = rng.randint(1, 3)
            size = sum(len(e.encode()) for e in events[index : index + take])
            index += take
            chunk_times.append([round(spread * min(index / len(events), 1.0), 1), size])
        chunk_times[0][0] = 0.0
        return "".join(events), chunk_times, completion_tokens


# --------------------------------------------------------------------------- generation


def db_bytes(path: Path) -> int:
    if db.postgres_url():
        conn = db.connect(path, readonly=True)
        try:
            return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        finally:
            conn.close()
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def generate(path: Path, count: int, seed: int, batch: int) -> dict[str, Any]:
    """Fill a new database with `count` flows, batch by batch, as the capture writer does."""
    db.ensure_database(path)
    conn = db.connect(path)
    try:
        rng = random.Random(seed)
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        keys = ["sk-bench-" + "".join(rng.choices(alphabet, k=30)) for _ in range(UPSTREAM_KEY_COUNT)]
        key_ids = add_keys(SqliteKeyStore(conn, key_cipher(path)), keys).added
        for name in CLIENT_NAMES:
            client_keys.create_client(conn, name)
        by_name = {row["name"]: row["id"] for row in client_keys.list_clients(conn)}
        client_ids = [by_name[name] for name in CLIENT_NAMES]
        factory = FlowFactory(rng, key_ids, client_ids)
        # One packer for the whole run, as the capture writer keeps one (compression dictionary,
        # parts already stored); a checkout from before packing has none.
        packer = flows.FlowPacker() if hasattr(flows, "FlowPacker") else None

        now = time.time()
        start, step = now - SPAN_SECONDS, SPAN_SECONDS / count
        making = inserting = 0.0
        began = last_report = time.perf_counter()
        for first in range(0, count, batch):
            t0 = time.perf_counter()
            rows = [factory.row(start + (first + i + rng.random()) * step) for i in range(min(batch, count - first))]
            t1 = time.perf_counter()
            with conn:
                flows.insert_batch(conn, rows, packer) if packer else flows.insert_batch(conn, rows)
                rollups.add_records(conn, rows)
                outcomes.add_records(conn, rows)
            t2 = time.perf_counter()
            making, inserting = making + t1 - t0, inserting + t2 - t1
            done = first + len(rows)
            if t2 - last_report >= 15 or done == count:
                last_report = t2
                print(
                    f"  generated {done:,} of {count:,} flows, {done / (t2 - began):,.0f} rows/s"
                    f" ({db_bytes(path) / 1e9:.2f} GB)",
                    file=sys.stderr,
                    flush=True,
                )
        # What the writer's purge round does once a minute: minute rollups older than two days go.
        with conn:
            rollups.drop_old_minutes(conn, time.time())
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if db.postgres_url():
            conn.execute("ANALYZE")  # what autovacuum would do soon: the planner's statistics
        elapsed = time.perf_counter() - began
        return {
            "rows": count,
            "seconds": round(elapsed, 1),
            "rows_per_second": round(count / elapsed, 1),
            "making_rows_seconds": round(making, 1),
            "inserting_seconds": round(inserting, 1),
            "insert_rows_per_second": round(count / inserting, 1) if inserting else None,
            "batch": batch,
            "seed": seed,
        }
    finally:
        conn.close()


def table_sizes(path: Path) -> dict[str, int]:
    """Bytes per table and index (the dbstat virtual table, when this SQLite has it)."""
    if db.postgres_url():
        pg_conn = db.connect(path, readonly=True)
        try:
            found = pg_conn.execute(
                "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i', 't')"
            ).fetchall()
            return {name: size for name, size in found}
        finally:
            pg_conn.close()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC").fetchall()
    except sqlite3.Error:
        return {}
    finally:
        conn.close()
    return dict(rows)


def size_groups(sizes: dict[str, int]) -> dict[str, int]:
    groups: dict[str, int] = {}
    for name, size in sizes.items():
        group = (
            "flows FTS index"
            if name.startswith("flows_fts")
            else "blobs (parts stored once)"
            if name == "blobs" or name.startswith("idx_blobs")
            else "flows indexes"
            if name.startswith("idx_flows")
            else "flows"
            if name == "flows"
            else "rollups"
            if "rollups" in name
            else "other"
        )
        groups[group] = groups.get(group, 0) + size
    return groups


@dataclass
class Facts:
    """What the cases need to know about the data: id range, keys, clients, time range."""

    flows: int
    min_id: int
    max_id: int
    newest: float
    key_ids: list[int]
    client_ids: list[int]
    rollup_hour_rows: int
    rollup_minute_rows: int


def read_facts(path: Path) -> Facts:
    conn = db.connect(path, readonly=True)
    try:
        low, high, newest = conn.execute("SELECT min(id), max(id), max(started_at) FROM flows").fetchone()
        return Facts(
            flows=flows.count_flows(conn),
            min_id=low or 0,
            max_id=high or 0,
            newest=newest or time.time(),
            key_ids=[row["id"] for row in upstream_keys.list_keys(conn)],
            client_ids=[row["id"] for row in client_keys.list_clients(conn) if row["name"] in CLIENT_NAMES],
            rollup_hour_rows=conn.execute(f"SELECT count(*) FROM {rollups.table_of('hour')}").fetchone()[0],
            rollup_minute_rows=conn.execute(f"SELECT count(*) FROM {rollups.table_of('minute')}").fetchone()[0],
        )
    finally:
        conn.close()


# --------------------------------------------------------------------------- UI latency


@dataclass
class Case:
    name: str
    kind: str  # list, search, dashboard, detail, metrics (no target)
    url: Callable[[int], str]  # the i-th request's URL
    page: bool = False  # an HTML page (session cookie) rather than the JSON API (Bearer)


@dataclass
class CaseResult:
    name: str
    kind: str
    target_ms: float | None
    requests: int = 0
    errors: int = 0
    error_sample: str = ""
    first_ms: float | None = None  # the first warm-up request: the least cached one
    p50_ms: float | None = None
    p95_ms: float | None = None
    max_ms: float | None = None
    rows: float | None = None  # flows per JSON page, on average
    verdict: str = "info"
    latencies: list[float] = field(default_factory=list, repr=False)

    def figures(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "latencies"}


PHRASES = ["gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small"]


def common_words() -> list[str]:
    return [VOCABULARY[i] for i in (0, 3, 12, 25, 40)]


def iso_minute(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M")


def build_cases(facts: Facts) -> list[Case]:
    rng = random.Random(7)
    common, uncommon = common_words(), UNCOMMON[::8]
    keys, clients = facts.key_ids or [1], facts.client_ids or [1]
    day_ago_10, day_ago_9 = iso_minute(facts.newest - 10 * 86400), iso_minute(facts.newest - 9 * 86400)
    span = max(1, facts.max_id - facts.min_id)

    def deep(i: int) -> int:
        # Near the oldest flows: within the first 2 % of ids, never the same page twice in a row.
        return facts.min_id + 1000 + (i * 7919) % max(1, span // 50)

    def pick(words: list[str]) -> Callable[[int], str]:
        return lambda i: words[i % len(words)]

    def q(i: int, **params: Any) -> str:
        return urlencode({k: (v(i) if callable(v) else v) for k, v in params.items()})

    ids = [rng.randint(facts.min_id, facts.max_id) for _ in range(5000)]
    cases = [
        Case("/flows newest page", "list", lambda i: "/flows", page=True),
        Case("/api/flows newest page", "list", lambda i: "/api/flows"),
        Case("/flows deep page (before= near oldest)", "list", lambda i: f"/flows?before={deep(i)}", page=True),
        Case("/api/flows deep page (before= near oldest)", "list", lambda i: f"/api/flows?before={deep(i)}"),
        Case("/api/flows?limit=500", "list", lambda i: "/api/flows?limit=500"),
        Case("/flows?status=5xx", "list", lambda i: "/flows?status=5xx", page=True),
        Case("/api/flows?status=5xx", "list", lambda i: "/api/flows?status=5xx"),
        Case("/api/flows?status=error", "list", lambda i: "/api/flows?status=error"),
        Case("/api/flows?model=o3-mini", "list", lambda i: "/api/flows?model=o3-mini"),
        Case("/api/flows?model=gpt-4-turbo (0.2 %)", "list", lambda i: "/api/flows?model=gpt-4-turbo"),
        Case("/api/flows?key=N", "list", lambda i: f"/api/flows?key={keys[i % len(keys)]}"),
        Case("/api/flows?client=N", "list", lambda i: f"/api/flows?client={clients[i % len(clients)]}"),
        Case("/api/flows?stream=yes&model=gpt-4o", "list", lambda i: "/api/flows?stream=yes&model=gpt-4o"),
        Case("/api/flows?path=/v1/embeddings", "list", lambda i: "/api/flows?path=/v1/embeddings"),
        Case(
            "/api/flows?status=4xx&model=gpt-4o&since&until (1 day)",
            "list",
            lambda i: "/api/flows?" + q(i, status="4xx", model="gpt-4o", since=day_ago_10, until=day_ago_9),
        ),
        Case(
            "/flows?status=5xx&key=N&since&until (1 day)",
            "list",
            lambda i: (
                "/flows?" + q(i, status="5xx", key=lambda j: keys[j % len(keys)], since=day_ago_10, until=day_ago_9)
            ),
            page=True,
        ),
        Case("/api/flows?status=5xx deep page", "list", lambda i: f"/api/flows?status=5xx&before={deep(i)}"),
        Case("/api/flows?after= (live update)", "list", lambda i: f"/api/flows?after={facts.max_id - 5}&limit=100"),
        Case("/api/flows?q=common word", "search", lambda i: "/api/flows?" + q(i, q=pick(common))),
        Case("/flows?q=common word", "search", lambda i: "/flows?" + q(i, q=pick(common)), page=True),
        Case("/api/flows?q=uncommon word (~0.3 %)", "search", lambda i: "/api/flows?" + q(i, q=pick(uncommon))),
        Case("/api/flows?q=rare word (~30 flows)", "search", lambda i: "/api/flows?" + q(i, q=pick(RARE))),
        Case("/flows?q=rare word", "search", lambda i: "/flows?" + q(i, q=pick(RARE)), page=True),
        Case("/api/flows?q=word in no flow", "search", lambda i: "/api/flows?" + q(i, q=ABSENT)),
        Case(
            "/api/flows?q=two common words",
            "search",
            lambda i: "/api/flows?" + q(i, q=f"{common[i % 5]} {common[(i + 2) % 5]}"),
        ),
        Case(
            "/api/flows?q=common uncommon common",
            "search",
            lambda i: "/api/flows?" + q(i, q=f"{common[i % 5]} {uncommon[i % len(uncommon)]} report"),
        ),
        Case(
            "/api/flows?q=two uncommon words",
            "search",
            lambda i: "/api/flows?" + q(i, q=f"{uncommon[i % len(uncommon)]} {uncommon[(i + 3) % len(uncommon)]}"),
        ),
        Case("/api/flows?q=common&status=5xx", "search", lambda i: "/api/flows?" + q(i, q=pick(common), status="5xx")),
        Case(
            "/flows?q=common&model=o3-mini",
            "search",
            lambda i: "/flows?" + q(i, q=pick(common), model="o3-mini"),
            page=True,
        ),
        Case(
            "/api/flows?q=uncommon&status=5xx", "search", lambda i: "/api/flows?" + q(i, q=pick(uncommon), status="5xx")
        ),
        Case(
            "/api/flows?q=common&model=gpt-4-turbo",
            "search",
            lambda i: "/api/flows?" + q(i, q=pick(common), model="gpt-4-turbo"),
        ),
        # Words FTS5 reads as several tokens are phrases: without positions in the index (v8),
        # candidates holding every token are checked; the last one has 400,000 candidates and no
        # match, so its pages stop at their budget of checks (storage.flows.PHRASE_CHECK_BUDGET).
        Case("/api/flows?q=phrase (a model name)", "search", lambda i: "/api/flows?" + q(i, q=pick(PHRASES))),
        Case("/flows?q=phrase (a model name)", "search", lambda i: "/flows?" + q(i, q=pick(PHRASES)), page=True),
        Case(
            "/api/flows?q=phrase of common words never side by side",
            "search",
            lambda i: "/api/flows?" + q(i, q=pick(["gpt-mini", "mini-gpt", "4o-gpt"])),
        ),
        Case("/api/flows?q=common deep page", "search", lambda i: "/api/flows?" + q(i, q=pick(common), before=deep)),
        Case(
            "/api/flows?q=common&since&until (1 day)",
            "search",
            lambda i: "/api/flows?" + q(i, q=pick(common), since=day_ago_10, until=day_ago_9),
        ),
        Case(
            "/api/flows?q=common&after= (live update)",
            "search",
            lambda i: "/api/flows?" + q(i, q=pick(common), after=facts.max_id - 5, limit=100),
        ),
        Case("/dashboard", "dashboard", lambda i: "/dashboard", page=True),
        Case("/api/dashboard", "dashboard", lambda i: "/api/dashboard"),
        Case("/flows/{id}", "detail", lambda i: f"/flows/{ids[i % len(ids)]}", page=True),
        Case("/api/flows/{id}", "detail", lambda i: f"/api/flows/{ids[(i + 2500) % len(ids)]}"),
        Case("/metrics", "metrics", lambda i: "/metrics"),
    ]
    return cases


def ui_clients(base_url: str) -> tuple[httpx.Client, httpx.Client]:
    """(API client with the admin key as Bearer, page client holding a session cookie from POST /login)."""
    timeout = httpx.Timeout(120.0)
    api = httpx.Client(base_url=base_url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=timeout)
    pages = httpx.Client(base_url=base_url, timeout=timeout)
    response = pages.post("/login", data={"admin_key": ADMIN_KEY, "next": "/flows"})
    if response.status_code != 303 or "keyrotor_session" not in pages.cookies:
        raise BenchError(f"POST /login did not give a session: {response.status_code} {response.text[:200]}")
    return api, pages


def timed_get(client: httpx.Client, url: str, page: bool) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.get(url)
    return time.perf_counter() - started, response


def check(response: httpx.Response, page: bool) -> str | None:
    if response.status_code != 200:
        return f"HTTP {response.status_code} {response.text[:200]!r}"
    if page and "text/html" not in response.headers.get("content-type", ""):
        return f"not a page: {response.headers.get('content-type')}"
    return None


def measure_cases(base_url: str, cases: list[Case], args: argparse.Namespace) -> list[CaseResult]:
    api, pages = ui_clients(base_url)
    results = []
    try:
        for case in cases:
            client = pages if case.page else api
            result = CaseResult(case.name, case.kind, TARGETS_MS.get(case.kind))
            rows = []
            for i in range(args.warmup):
                elapsed, response = timed_get(client, case.url(i), case.page)
                if i == 0:
                    result.first_ms = round(elapsed * 1000, 2)
            deadline = time.perf_counter() + args.max_case_seconds
            for i in range(args.warmup, args.warmup + args.requests):
                if time.perf_counter() > deadline:
                    break
                elapsed, response = timed_get(client, case.url(i), case.page)
                result.requests += 1
                problem = check(response, case.page)
                if problem:
                    result.errors += 1
                    result.error_sample = result.error_sample or f"{case.url(i)}: {problem}"
                    continue
                result.latencies.append(elapsed)
                if not case.page and case.url(i).startswith("/api/flows") and "flows" in response.text[:10]:
                    rows.append(len(response.json()["flows"]))
            finish_result(result)
            result.rows = round(sum(rows) / len(rows), 1) if rows else None
            results.append(result)
            print(
                f"  {case.name:<58} p50 {fmt(result.p50_ms, 1):>8} p95 {fmt(result.p95_ms, 1):>8} ms  {result.verdict}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        api.close()
        pages.close()
    return results


def finish_result(result: CaseResult) -> None:
    result.p50_ms = ms(percentile(result.latencies, 50))
    result.p95_ms = ms(percentile(result.latencies, 95))
    result.max_ms = ms(max(result.latencies)) if result.latencies else None
    if result.target_ms is not None and result.p95_ms is not None:
        result.verdict = "PASS" if result.p95_ms < result.target_ms else "MISS"
    if result.errors:
        result.verdict = "ERROR"


def start_ui(env: Environment, db_path: Path) -> str:
    port = free_port()
    argv = [PYTHON, str(RUN_PY), "ui", "--storage-path", str(db_path), "--ui-port", str(port)]
    proc, log_path = env.procs.start("ui", argv, env.env)
    wait_for_port(port, proc, log_path, "run.py ui")
    return f"http://{HOST}:{port}"


# --------------------------------------------------------------------------- UI loop (another process)


def ui_loop_cases(config: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """What someone watching the UI during the load asks for, over and over: (kind, URL, page?)."""
    common, uncommon = config["common"], config["uncommon"]
    rng = random.Random(11)
    low, high = config["min_id"], config["max_id"]
    cases = []
    for i in range(50):
        cases += [
            ("list", "/flows", True),
            ("list", "/api/flows?limit=100", False),
            ("search", "/api/flows?" + urlencode({"q": common[i % len(common)]}), False),
            ("search", "/flows?" + urlencode({"q": uncommon[i % len(uncommon)]}), True),
            ("dashboard", "/dashboard", True),
            ("dashboard", "/api/dashboard", False),
            ("detail", f"/api/flows/{rng.randint(low, high)}", False),
        ]
    return cases


def ui_loop(config_json: str) -> int:
    """Query the UI back to back until SIGTERM, then write each kind's latencies to config['out']."""
    config = json.loads(config_json)
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    api, pages = ui_clients(config["url"])
    cases = ui_loop_cases(config)
    started = time.perf_counter()
    try:
        i = 0
        while not stopping:
            kind, url, page = cases[i % len(cases)]
            i += 1
            elapsed, response = timed_get(pages if page else api, url, page)
            problem = check(response, page)
            if problem:
                errors.append(f"{url}: {problem}")
                continue
            latencies.setdefault(kind, []).append(elapsed)
    finally:
        api.close()
        pages.close()
        Path(config["out"]).write_text(
            json.dumps(
                {
                    "seconds": time.perf_counter() - started,
                    "latencies": latencies,
                    "errors": errors[:20],
                    "error_count": len(errors),
                }
            )
        )
    return 0


# --------------------------------------------------------------------------- capture under UI load


def count_new_rows(conn: sqlite3.Connection, after_id: int) -> int:
    return conn.execute("SELECT count(*) FROM flows WHERE id > ?", (after_id,)).fetchone()[0]


def newest_id(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT coalesce(max(id), 0) FROM flows").fetchone()[0]


async def wait_for_rows(conn: sqlite3.Connection, after_id: int, expected: int, timeout: float) -> float | None:
    """Poll until `expected` rows above `after_id` are visible; the monotonic time they were, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(count_new_rows, conn, after_id) >= expected:
            return time.monotonic()
        await asyncio.sleep(0.005)
    return None


@dataclass
class CaptureRound:
    ui_load: bool
    seconds: float = 0.0
    sent: int = 0  # requests completed, any status
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_sample: str = ""
    rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    proxy_cpu_ms_per_req: float | None = None
    rows_before: int = 0
    rows_after: int = 0
    new_rows: int = 0
    exact: bool = False
    lag_ms: float | None = None  # last response -> last row visible to a reader
    max_backlog_rows: int = 0  # responses received but not yet visible as rows, sampled every 0.25 s
    max_backlog_seconds: float | None = None
    verdict: str = ""
    ui: dict[str, Any] = field(default_factory=dict)


async def capture_round(
    env: Environment, target: Target, db_path: Path, args: argparse.Namespace, facts: Facts, ui_url: str | None
) -> CaptureRound:
    result = CaptureRound(ui_load=ui_url is not None)
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency, keepalive_expiry=KEEPALIVE_EXPIRY
    )
    reader = db.connect(db_path, readonly=True)
    sampler_conn = db.connect(db_path, readonly=True)
    loop_proc = None
    try:
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
            warm = Load(client, target, stream=False)
            before_warm = await asyncio.to_thread(newest_id, reader)
            await warm.run(args.capture_warmup, args.concurrency, 60)
            if warm.errors:
                raise BenchError(
                    f"warm-up through the proxy failed: {dict(warm.errors)}, e.g. {warm.sample_error}\n"
                    + log_tail(target.log_path)
                )
            if await wait_for_rows(reader, before_warm, warm.done, 60) is None:
                raise BenchError("the warm-up's rows did not all appear within 60 s")
            await settle(target.pid)

            base_id = await asyncio.to_thread(newest_id, reader)
            result.rows_before = await asyncio.to_thread(flows.count_flows, reader)
            if ui_url is not None:
                out = env.tmp / f"ui-loop-{time.monotonic_ns()}.json"
                config = {
                    "url": ui_url,
                    "out": str(out),
                    "common": common_words(),
                    "uncommon": UNCOMMON[::8],
                    "min_id": facts.min_id,
                    "max_id": facts.max_id,
                }
                loop_proc, loop_log = env.procs.start(
                    "ui-loop", [PYTHON, str(Path(__file__).resolve()), "--ui-loop", json.dumps(config)], env.env
                )
                await asyncio.sleep(1.0)  # logged in and querying before the load starts
                if loop_proc.poll() is not None:
                    raise BenchError("the UI query loop stopped at once:\n" + log_tail(loop_log))
            cpu_before = cpu_seconds(target.pid)
            load = Load(client, target, stream=False)

            async def sample() -> None:
                while True:
                    await asyncio.sleep(0.25)
                    responded = load.done
                    visible = await asyncio.to_thread(count_new_rows, sampler_conn, base_id)
                    result.max_backlog_rows = max(result.max_backlog_rows, responded - visible)

            sampler = asyncio.create_task(sample())
            elapsed = await load.run(10**9, args.concurrency, args.capture_seconds)
            last_response = time.monotonic()
            sampler.cancel()
            visible_at = await wait_for_rows(reader, base_id, load.done, 60)
            result.lag_ms = None if visible_at is None else round((visible_at - last_response) * 1000, 1)
            if loop_proc is not None:
                env.procs.stop(loop_proc)
                loop_proc = None
                result.ui = ui_loop_figures(json.loads(out.read_text()))
            await settle(target.pid)
            result.proxy_cpu_ms_per_req = round((cpu_seconds(target.pid) - cpu_before) * 1000 / max(1, load.done), 3)
    finally:
        if loop_proc is not None:
            env.procs.stop(loop_proc)
        sampler_conn.close()
    try:
        result.rows_after = flows.count_flows(reader)
        result.new_rows = count_new_rows(reader, base_id)
    finally:
        reader.close()
    result.seconds = round(elapsed, 2)
    result.sent, result.ok = load.done, len(load.latencies)
    result.errors, result.error_sample = dict(load.errors), load.sample_error
    result.rps = round(result.ok / elapsed, 1) if elapsed else 0.0
    result.p50_ms = ms(percentile(load.latencies, 50))
    result.p99_ms = ms(percentile(load.latencies, 99))
    result.exact = result.new_rows == result.sent and result.rows_after - result.rows_before == result.sent
    if result.rps:
        result.max_backlog_seconds = round(result.max_backlog_rows / result.rps, 2)
    keeps_up = result.exact and result.lag_ms is not None and result.lag_ms <= CAPTURE_LAG_LIMIT_S * 1000
    result.verdict = "PASS" if keeps_up and not result.errors else "MISS"
    return result


def ui_loop_figures(document: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "seconds": round(document["seconds"], 1),
        "errors": document["error_count"],
        "error_sample": document["errors"][:1],
        "kinds": {},
    }
    for kind, values in document["latencies"].items():
        p95 = ms(percentile(values, 95))
        target = TARGETS_MS.get(kind)
        figures["kinds"][kind] = {
            "requests": len(values),
            "p50_ms": ms(percentile(values, 50)),
            "p95_ms": p95,
            "max_ms": ms(max(values)),
            "target_ms": target,
            "vs_target": None if target is None or p95 is None else ("PASS" if p95 < target else "MISS"),
        }
    return figures


def run_capture(env: Environment, db_path: Path, ui_url: str, args: argparse.Namespace, facts: Facts) -> list:
    _, upstream_url = start_upstream(env.procs, "upstream", env.env, [])
    conn = db.connect(db_path)
    try:
        # A fresh client per run: a reused database has only the hashes of earlier ones.
        env.client_key = client_keys.create_client(conn, f"bench-capture-{time.time_ns()}")
        stuck = upstream_keys.ids_in_state(conn, ("cooling", "exhausted", "invalid", "disabled"))
        upstream_keys.set_admin_state(conn, stuck, "active", "reset by bench/ui_million.py")
    finally:
        conn.close()
    # Retention off: the oldest generated flows turn 30 days old while the bench runs, and a
    # purge would make "rows grew by exactly the requests sent" unmeasurable.
    env.proxy_env["KEYROTOR_CAPTURE_KEEP_DAYS"] = "0"
    target = env.start_proxy("keyrotor", upstream_url, "capture")
    rounds = []
    for with_ui in (False, True):
        result = asyncio.run(capture_round(env, target, db_path, args, facts, ui_url if with_ui else None))
        rounds.append(result)
        print(
            f"  capture {'with' if with_ui else 'without'} UI load: {result.rps} req/s, {result.sent} sent,"
            f" {result.new_rows} new rows, lag {fmt(result.lag_ms, 1)} ms  {result.verdict}",
            file=sys.stderr,
            flush=True,
        )
    return rounds


# --------------------------------------------------------------------------- report


def report(
    args: argparse.Namespace,
    generation: dict | None,
    facts: Facts,
    sizes: dict[str, int],
    db_size: int,
    results: list[CaseResult],
    capture: list[CaptureRound],
) -> str:
    lines = []
    if generation:
        lines.append(
            f"Generated {generation['rows']:,} flows in {generation['seconds']:.0f} s:"
            f" {generation['rows_per_second']:,.0f} rows/s overall, {generation['insert_rows_per_second']:,.0f}"
            f" rows/s in insert_batch + add_records alone ({generation['batch']:,} per transaction)."
        )
    else:
        lines.append("Reused the database as it was (no generation).")
    parts = ", ".join(f"{name} {size / 1e9:.2f} GB" for name, size in sorted(sizes.items(), key=lambda x: -x[1]))
    lines.append(
        f"Database: {facts.flows:,} flows, {db_size / 1e9:.2f} GB" + (f" ({parts})" if parts else "") + ";"
        f" rollups: {facts.rollup_hour_rows:,} hour rows, {facts.rollup_minute_rows:,} minute rows."
    )
    if facts.flows:
        per_part = ", ".join(
            f"{name} {size / facts.flows:,.0f}" for name, size in sorted(sizes.items(), key=lambda x: -x[1])
        )
        lines.append(f"Bytes per flow: {db_size / facts.flows:,.0f} in the file ({per_part}).")
    lines += [
        "",
        f"UI latency, ms ({args.requests} sequential requests per case after {args.warmup} warm-up;"
        " 'first' is the first warm-up request):",
        f"{'case':<58} {'p50':>7} {'p95':>7} {'max':>7} {'first':>7} {'rows':>5} {'target':>7}  verdict",
    ]
    for r in results:
        target = f"<{r.target_ms:.0f}" if r.target_ms else "-"
        lines.append(
            f"{r.name:<58} {fmt(r.p50_ms, 1):>7} {fmt(r.p95_ms, 1):>7} {fmt(r.max_ms, 1):>7} {fmt(r.first_ms, 1):>7}"
            f" {fmt(r.rows, 0):>5} {target:>7}  {r.verdict}"
            + (f" ({r.requests} requests)" if r.requests < args.requests else "")
        )
    for r in results:
        if r.error_sample:
            lines.append(f"  error in {r.name}: {r.error_sample}")
    if capture:
        lines += [
            "",
            f"Capture at saturation (c={args.concurrency}, {args.capture_seconds:g} s,"
            " non-streamed chat, same database):",
            f"{'':<16} {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/req':>10} {'sent':>6} {'new rows':>8}"
            f" {'exact':>5} {'lag ms':>7} {'backlog':>8}  verdict",
        ]
        for c in capture:
            lines.append(
                f"{'with UI load' if c.ui_load else 'without UI load':<16} {c.rps:>6.1f} {fmt(c.p50_ms, 1):>7}"
                f" {fmt(c.p99_ms, 1):>7} {fmt(c.proxy_cpu_ms_per_req, 2):>10} {c.sent:>6} {c.new_rows:>8}"
                f" {'yes' if c.exact else 'NO':>5} {fmt(c.lag_ms, 1):>7} {c.max_backlog_rows:>8}  {c.verdict}"
                + (f"  errors {c.errors}: {c.error_sample}" if c.errors else "")
            )
        for c in capture:
            if c.ui:
                lines += [
                    "",
                    f"UI during the load (one client, back to back, {c.ui['seconds']} s; {c.ui['errors']} errors):",
                    f"{'kind':<10} {'requests':>8} {'p50':>7} {'p95':>7} {'max':>7} {'target':>7}  vs target",
                ]
                for kind, k in c.ui["kinds"].items():
                    target = f"<{k['target_ms']:.0f}" if k["target_ms"] else "-"
                    lines.append(
                        f"{kind:<10} {k['requests']:>8} {fmt(k['p50_ms'], 1):>7} {fmt(k['p95_ms'], 1):>7}"
                        f" {fmt(k['max_ms'], 1):>7} {target:>7}  {k['vs_target'] or '-'}"
                    )
    missed = [r.name for r in results if r.verdict in ("MISS", "ERROR")]
    lines += [
        "",
        f"Targets: {sum(r.verdict == 'PASS' for r in results)} PASS, {len(missed)} MISS"
        + (f" ({'; '.join(missed)})" if missed else "")
        + (
            "" if not capture else f"; capture keeps up: {'yes' if all(c.verdict == 'PASS' for c in capture) else 'NO'}"
        ),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--rows", type=int, default=1_000_000, help="flows to generate (default 1,000,000)")
    add("--requests", type=int, default=200, help="measured requests per UI case (default 200)")
    add("--warmup", type=int, default=5, help="unmeasured requests before each UI case (default 5)")
    add("--max-case-seconds", type=float, default=120.0, help="time limit of one UI case; it stops early (default 120)")
    add(
        "--db",
        type=Path,
        metavar="PATH",
        help="database to use: generated there when it holds no flows, else reused as it is (and always kept)",
    )
    add("--keep", action="store_true", help="keep the generated temp database (its path is printed)")
    add("--seed", type=int, default=1, help="random seed of the generator (default 1)")
    add("--batch", type=int, default=5000, help="flows per transaction while generating (default 5000)")
    add("--skip-capture", action="store_true", help="measure the UI only, not capture under UI load")
    add("--capture-seconds", type=float, default=30.0, help="length of each capture round (default 30)")
    add("--capture-warmup", type=int, default=200, help="unmeasured proxy requests before each round (default 200)")
    add("--concurrency", type=int, default=32, help="proxy requests in flight during capture (default 32)")
    add("--json", type=Path, metavar="PATH", help="write every figure to this file")
    add("--cases", metavar="TEXT", help="measure only the UI cases whose name contains TEXT")
    add(
        "--postgres",
        action="store_true",
        help="generate into and measure on PostgreSQL: the database at $KEYROTOR_BENCH_STORAGE_URL",
    )
    add("--ui-loop", help=argparse.SUPPRESS)  # internal: the UI query loop of the capture phase
    args = parser.parse_args(argv)
    check_ranges(
        parser,
        args,
        ("rows", "requests", "batch", "capture_seconds", "concurrency", "max_case_seconds"),
        ("warmup", "capture_warmup"),
    )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ui_loop:
        return ui_loop(args.ui_loop)
    if not sys.platform.startswith("linux"):
        print("ui_million: needs Linux: CPU time is read from /proc", file=sys.stderr)
        return 2
    # Same rule as the child processes get (Environment): keyrotor's settings come from
    # config.toml only, and the secret from the file beside the database.
    postgres_url = os.environ.get("KEYROTOR_BENCH_STORAGE_URL", "") if args.postgres else ""
    if args.postgres and not postgres_url:
        print("ui_million: --postgres needs KEYROTOR_BENCH_STORAGE_URL=postgresql://…", file=sys.stderr)
        return 2
    for name in [n for n in os.environ if n.startswith("KEYROTOR_")]:
        del os.environ[name]
    stop_on_sigterm()
    started = time.time()
    temp_dir = None
    if args.db:
        db_path = args.db.resolve()
    else:
        temp_dir = Path(tempfile.mkdtemp(prefix="keyrotor-million-"))
        db_path = temp_dir / "kr.db"
    env = Environment(argparse.Namespace(verbose_proxies=False))
    env.db_path = db_path
    env.env["KEYROTOR_STORAGE_PATH"] = env.proxy_env["KEYROTOR_STORAGE_PATH"] = str(db_path)
    if postgres_url:  # the data in PostgreSQL; the secrets still in files beside db_path
        db.use_postgres(postgres_url)
        env.env["KEYROTOR_STORAGE_URL"] = env.proxy_env["KEYROTOR_STORAGE_URL"] = postgres_url
        db_path.parent.mkdir(parents=True, exist_ok=True)
    generation = None
    try:
        print(f"database {db_path}; logs in {env.tmp} while it runs", file=sys.stderr, flush=True)
        if (db_path.exists() or postgres_url) and read_facts_safely(db_path):
            print(f"reusing {db_path} as it is", file=sys.stderr, flush=True)
        else:
            generation = generate(db_path, args.rows, args.seed, args.batch)
        db_size = db_bytes(db_path)
        sizes = size_groups(table_sizes(db_path))
        facts = read_facts(db_path)
        ui_url = start_ui(env, db_path)
        cases = [c for c in build_cases(facts) if not args.cases or args.cases in c.name]
        results = measure_cases(ui_url, cases, args)
        capture = [] if args.skip_capture else run_capture(env, db_path, ui_url, args, facts)
    except BenchError as e:
        print(f"ui_million: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ui_million: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        env.close()
        if temp_dir is not None:
            if args.keep:
                print(f"kept the database: {db_path} (use it again with --db {db_path})", file=sys.stderr)
            else:
                shutil.rmtree(temp_dir, ignore_errors=True)
    print(report(args, generation, facts, sizes, db_size, results, capture))
    if args.json:
        document = {
            **run_facts(started, args, leave_out=("ui_loop",)),
            "generation": generation,
            "database": {"bytes": db_size, "by_part": sizes, **asdict(facts)},
            "ui": [r.figures() for r in results],
            "capture": [asdict(c) for c in capture],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    if any(r.errors for r in results) or any(c.errors for c in capture):
        return 1
    missed = any(r.verdict == "MISS" for r in results) or any(c.verdict != "PASS" for c in capture)
    return 3 if missed else 0


def read_facts_safely(path: Path) -> bool:
    """True when the database at `path` already holds flows."""
    try:
        conn = db.connect(path, readonly=True)
        try:
            return flows.count_flows(conn) > 0
        finally:
            conn.close()
    except sqlite3.Error:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
