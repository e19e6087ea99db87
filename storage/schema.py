"""Migrations, applied in order and tracked in PRAGMA user_version.

Tables are created here explicitly with sqlite_utils, never by a first insert.
A migration is only ever appended, never edited once released.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

import sqlite_utils

from core.records import FlowRecord


def _v1_initial(db: sqlite_utils.Database) -> None:
    db.table("revisions").create({"name": str, "value": int}, pk="name")
    db.table("upstream_keys").create(
        {
            "id": int,
            "fingerprint": str,  # keyed hash of the value: finds duplicates without decrypting
            "secret": bytes,  # the value, Fernet-encrypted: the only place it is stored
            "last4": str,
            "state": str,
            "state_reason": str,
            "cooldown_until": float,
            "weight": float,
            "requests": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "last_used_at": float,
            "created_at": float,
            "state_changed_at": float,
        },
        pk="id",
        not_null={"fingerprint", "secret", "last4", "state", "created_at"},
        defaults={"state": "active", "weight": 1.0, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0},
    )
    db.table("upstream_keys").create_index(["fingerprint"], unique=True)
    db.table("client_keys").create(
        {
            "id": int,
            "name": str,
            "key_hash": str,  # sha256 of the issued key; the key itself is never stored
            "last4": str,
            "enabled": int,
            "requests": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "last_used_at": float,
            "created_at": float,
        },
        pk="id",
        not_null={"name", "key_hash", "last4", "created_at"},
        defaults={"enabled": 1, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0},
    )
    db.table("client_keys").create_index(["name"], unique=True)
    db.table("client_keys").create_index(["key_hash"], unique=True)
    db.table("flows").create(
        {
            "id": int,
            "flow_id": str,  # mitmproxy's flow id, to find the same flow in mitmweb
            "started_at": float,
            "first_byte_at": float,
            "ended_at": float,
            "duration_ms": float,
            "method": str,
            "path": str,
            "status": int,
            "model": str,
            "stream": int,
            "client_key_id": int,
            "upstream_key_id": int,
            "attempts": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "total_tokens": int,
            "cost": float,
            "client_addr": str,
            "error": str,
            "request_headers": str,
            "response_headers": str,
            "request_body": str,
            "request_body_size": int,
            "request_body_truncated": int,
            "response_body": str,
            "response_body_size": int,
            "response_body_truncated": int,
            "chunk_times": str,  # JSON [[ms since first byte, bytes], ...] of a streamed body
        },
        pk="id",
        not_null={"flow_id", "started_at", "method", "path"},
    )
    for columns in (["started_at"], ["status"], ["model"], ["client_key_id"], ["upstream_key_id"]):
        db.table("flows").create_index(columns)
    db.table("flows").enable_fts(
        ["path", "model", "request_body", "response_body"], fts_version="FTS5", create_triggers=True
    )


def _v2_attempts_and_cost(db: sqlite_utils.Database) -> None:
    # One row per upstream attempt of a flow: a retried request has several.
    db.table("attempts").create(
        {
            "id": int,
            "flow_id": str,  # flows.flow_id
            "attempt": int,  # 1 for the first try
            "upstream_key_id": int,
            "status": int,  # None when no answer came (connection error, timeout)
            "error": str,
            "started_at": float,
            "duration_ms": float,
        },
        pk="id",
        not_null={"flow_id", "attempt", "started_at"},
    )
    db.table("attempts").create_index(["flow_id"])
    for table in ("upstream_keys", "client_keys"):
        db.table(table).add_column("cost", float, not_null_default=0.0)


_V3_DIMENSIONS = ("bucket", "model", "upstream_key_id", "client_key_id")


def _v3_rollups(db: sqlite_utils.Database) -> None:
    # Rollups by (bucket, model, upstream key, client key); v4 replaced this layout, so it is
    # spelled out here rather than taken from rollups.py.
    from storage import rollups

    for grain in rollups.GRAINS:
        types: dict[str, type] = {"bucket": int, "model": str, "upstream_key_id": int, "client_key_id": int}
        types |= {c: (float if c in ("cost", "duration_ms") else int) for c in rollups.VALUES}
        db.table(rollups.table_of(grain)).create(types, pk=_V3_DIMENSIONS, defaults={c: 0 for c in rollups.VALUES})
    # Existing flows are folded in once, in slices, so the dashboard starts complete.
    columns = (
        "started_at, first_byte_at, duration_ms, status, error, model, stream, upstream_key_id,"
        " client_key_id, prompt_tokens, completion_tokens, cost"
    )
    names = ["id", *columns.replace(" ", "").split(",")]
    placeholders = ", ".join("?" * (len(_V3_DIMENSIONS) + len(rollups.VALUES)))
    last = 0
    while True:
        rows = [
            dict(zip(names, r, strict=True))
            for r in db.conn.execute(f"SELECT id, {columns} FROM flows WHERE id > ? ORDER BY id LIMIT 50000", (last,))
        ]
        if not rows:
            break
        for grain, seconds in rollups.GRAINS.items():
            sums: dict[tuple, list] = {}
            for row in rows:
                key = (
                    int(row["started_at"] // seconds) * seconds,
                    row["model"] or "",
                    row["upstream_key_id"] or 0,
                    row["client_key_id"] or 0,
                )
                rollups.add_record_values(sums.setdefault(key, [0] * len(rollups.VALUES)), _v3_record(row))
            db.conn.executemany(
                f"INSERT INTO {rollups.table_of(grain)} VALUES ({placeholders})"
                f" ON CONFLICT ({', '.join(_V3_DIMENSIONS)}) DO UPDATE SET "
                + ", ".join(f"{c} = {c} + excluded.{c}" for c in rollups.VALUES),
                [(*key, *values) for key, values in sums.items()],
            )
        last = rows[-1]["id"]


def _v3_record(row: dict) -> FlowRecord:
    # What the v3 backfill read of a stored flow, as the record the rollups fold in.
    return FlowRecord(flow_id="", method="", path="", **{k: v for k, v in row.items() if k != "id"})


def _v4_rollups_by_dimension(db: sqlite_utils.Database) -> None:
    # One row per (dimension, bucket, value) instead of per (bucket, model, key, client): the
    # combinations made nearly a row per flow, and a day's dashboard summed tens of thousands.
    # Converted from the v3 tables, which keep history that retention purged from flows.
    from storage import rollups

    for grain in rollups.GRAINS:
        db.conn.execute(f"ALTER TABLE {rollups.table_of(grain)} RENAME TO {rollups.table_of(grain)}_v3")
    rollups.create_tables(db)
    sums = ", ".join(f"sum({c})" for c in rollups.VALUES)
    # The dimensions the v3 tables had columns for; later ones (upstream, group) start empty.
    v3_dimensions = {"minute": (rollups.ALL,), "hour": (rollups.ALL, "model", "upstream_key_id", "client_key_id")}
    for grain, dimensions in v3_dimensions.items():
        table = rollups.table_of(grain)
        for dimension in dimensions:
            if dimension == rollups.ALL:
                value = "''"
            elif dimension == "model":
                value = "model"
            else:
                value = f"CASE WHEN {dimension} = 0 THEN '' ELSE CAST({dimension} AS TEXT) END"
            db.conn.execute(
                f"INSERT INTO {table} (dimension, bucket, value, {', '.join(rollups.VALUES)})"
                f" SELECT ?, bucket, {value}, {sums} FROM {table}_v3 GROUP BY bucket, {value}",
                (dimension,),
            )
        db.conn.execute(f"DROP TABLE {table}_v3")


def _v5_upstream_key_names(db: sqlite_utils.Database) -> None:
    # An optional label an admin gives a key ("Key 1", "team-a"); not unique, the last four tell keys apart.
    db.table("upstream_keys").add_column("name", str)


def _v6_attempt_outcomes(db: sqlite_utils.Database) -> None:
    # Attempts by outcome, retries and refusals join the hour rollups (storage/outcomes.py); the
    # flows already stored are counted once here, so /metrics starts from what the database holds.
    from storage import outcomes

    outcomes.backfill(db.conn)


def _v7_upstreams_groups_models(db: sqlite_utils.Database) -> None:
    # Many upstreams (OpenAI, Azure resources, relay stations), each with groups that have their
    # own keys and models. What existed becomes upstream "default" (base_url NULL: whatever
    # proxy.upstream / --mode reverse:URL says) with group "default" holding every key.
    now = time.time()
    db.table("upstreams").create(
        {
            "id": int,
            "name": str,
            "base_url": str,  # NULL: the proxy's own upstream setting
            "dialect": str,  # openai, azure
            "api_version": str,  # Azure's api-version query parameter
            "enabled": int,
            "created_at": float,
        },
        pk="id",
        not_null={"name", "dialect", "enabled", "created_at"},
        defaults={"dialect": "openai", "enabled": 1},
    )
    db.table("upstreams").create_index(["name"], unique=True)
    db.table("groups").create(
        {
            "id": int,
            "upstream_id": int,
            "name": str,
            "priority": int,  # higher first
            "weight": float,  # share among groups of the same priority
            "enabled": int,
            "models_refreshed_at": float,
            "created_at": float,
        },
        pk="id",
        not_null={"upstream_id", "name", "priority", "weight", "enabled", "created_at"},
        defaults={"priority": 0, "weight": 1.0, "enabled": 1},
        foreign_keys=[("upstream_id", "upstreams", "id")],
    )
    db.table("groups").create_index(["upstream_id", "name"], unique=True)
    db.table("group_models").create(
        {
            "id": int,
            "group_id": int,
            "model": str,  # the name clients use
            "upstream_model": str,  # the name upstream uses (an Azure deployment, a relay's snapshot); NULL: same
            "source": str,  # manual, fetched
            "created_at": float,
        },
        pk="id",
        not_null={"group_id", "model", "source", "created_at"},
        foreign_keys=[("group_id", "groups", "id")],
    )
    db.table("group_models").create_index(["group_id", "model"], unique=True)
    db.table("group_models").create_index(["model"])
    db.table("model_fallbacks").create(
        {"model": str, "position": int, "fallback": str}, pk=("model", "position"), not_null={"fallback"}
    )
    db.conn.execute(
        "INSERT INTO upstreams (name, base_url, dialect, enabled, created_at) VALUES ('default', NULL, 'openai', 1, ?)",
        (now,),
    )
    db.conn.execute(
        "INSERT INTO groups (upstream_id, name, priority, weight, enabled, created_at)"
        " SELECT id, 'default', 0, 1.0, 1, ? FROM upstreams WHERE name = 'default'",
        (now,),
    )
    default_group = db.conn.execute("SELECT id FROM groups WHERE name = 'default'").fetchone()[0]
    db.table("upstream_keys").add_column("group_id", int)
    db.conn.execute("UPDATE upstream_keys SET group_id = ?", (default_group,))
    db.table("upstream_keys").create_index(["group_id"])
    for table in ("flows", "attempts"):
        db.table(table).add_column("upstream_id", int)
        db.table(table).add_column("group_id", int)
    db.table("flows").add_column("fallback_model", str)  # the model that answered instead of the one asked for
    db.table("attempts").add_column("model", str)  # the model this attempt asked upstream for, when not the flow's
    for columns in (["upstream_id"], ["group_id"]):
        db.table("flows").create_index(columns)


def _v8_every_endpoint(db: sqlite_utils.Database) -> None:
    # Every endpoint captured right: cached and reasoning tokens beside the totals; bodies that
    # are not text (audio, images, an upload's file) as bytes with their type, never as text;
    # a WebSocket session's messages (JSON [[ms since start, direction, kind, bytes, text], ...]).
    columns = {
        "cached_tokens": int,
        "reasoning_tokens": int,
        "request_body_type": str,
        "request_body_bytes": bytes,
        "response_body_type": str,
        "response_body_bytes": bytes,
        "websocket_messages": str,
    }
    for name, kind in columns.items():
        db.table("flows").add_column(name, kind)


def _v9_clients_limits_audit(db: sqlite_utils.Database) -> None:
    # Clients own keys: a client (person, team, service) holds several client keys, and limits
    # and usage are the client's. Each existing key becomes a client of its own, with the same
    # id and name, so the flows recorded under a key's id belong to its client.
    db.table("clients").create(
        {
            "id": int,
            "name": str,
            "enabled": int,
            "limits": str,  # JSON of core.limits.ClientPolicy's fields that are set
            "created_at": float,
            "changed_at": float,
        },
        pk="id",
        not_null={"name", "enabled", "created_at"},
        defaults={"enabled": 1, "limits": "{}"},
    )
    db.table("clients").create_index(["name"], unique=True)
    db.conn.execute(
        "INSERT INTO clients (id, name, enabled, limits, created_at) SELECT id, name, enabled, '{}', created_at"
        " FROM client_keys"
    )
    db.table("client_keys").add_column("client_id", int)
    db.table("client_keys").add_column("revoked_at", float)
    db.conn.execute("UPDATE client_keys SET client_id = id")
    db.conn.execute("DROP INDEX IF EXISTS idx_client_keys_name")  # a key's name is its client's: no longer unique
    db.table("client_keys").create_index(["client_id"])
    db.table("flows").add_column("client_id", int)  # the client whose key made the request
    db.table("flows").add_column("refusal", str)  # the error code keyrotor refused the request with, if it did
    # Rows stored before get their client_id as storage/conversion.py converts them, a chunk
    # a transaction (one UPDATE of every flow held the write lock, and a proxy's start, for
    # many minutes at a million flows); until then search takes client_key_id for it (each
    # client made here has its key's id).
    db.table("flows").create_index(["client_id"])
    db.table("flows").create_index(["refusal"])
    # Calendar spend and moving windows of client limits, saved so a restarted proxy keeps them:
    # a total per counter name, and what each window took per second (written as it changes).
    db.table("limit_counters").create(
        {"name": str, "value": float, "updated_at": float}, pk="name", not_null={"value", "updated_at"}
    )
    db.table("limit_windows").create(
        {"name": str, "second": int, "amount": float}, pk=("name", "second"), not_null={"amount"}
    )
    db.table("limit_windows").create_index(["second"])
    db.table("audit_log").create(
        {
            "id": int,
            "at": float,
            "actor": str,  # cli, ui-session, admin-api
            "address": str,  # where the act came from (None for the CLI)
            "action": str,  # e.g. keys.disable, clients.set, login.failed
            "target": str,  # ids or names of what it acted on
            "changes": str,  # JSON of the fields changed, never a secret
        },
        pk="id",
        not_null={"at", "actor", "action"},
    )
    for columns in (["at"], ["action"], ["actor"]):
        db.table("audit_log").create_index(columns)


def _v10_object_owners(db: sqlite_utils.Database) -> None:
    # Key affinity: which upstream key made each object (files, batches, stored responses...),
    # and which objects each flow created or used. Rows outlive their key: a request for an
    # object of a deleted key is told so.
    db.table("object_owners").create(
        {"object_id": str, "kind": str, "upstream_key_id": int, "flow_id": str, "created_at": float},
        pk="object_id",
        not_null={"kind", "upstream_key_id", "created_at"},
    )
    db.table("object_owners").create_index(["upstream_key_id"])
    db.table("flow_objects").create(
        {"flow_id": str, "object_id": str, "role": str},  # role: created, used
        pk=("flow_id", "object_id"),
        not_null={"role"},
    )


def _v11_packed_flows(db: sqlite_utils.Database) -> None:
    # Headers and bodies packed into one zstd frame per flow (`content`), repeated parts kept
    # once in blobs (`parts` says where they go back), and a full-text index that keeps neither
    # a copy of the text nor positions (contentless, detail=none; storage/flows.py checks
    # phrases). Existing rows stay as they are, readable, and are converted in chunks by
    # storage/conversion.py: ids in (low, high] of flows_legacy are not converted yet and are
    # searched in the old index, renamed flows_fts_legacy. Nothing here reads the flows.
    db.table("compression_dictionaries").create(
        {"id": int, "data": bytes, "samples": int, "created_at": float}, pk="id", not_null={"data", "created_at"}
    )
    db.table("blobs").create(
        {"id": int, "digest": bytes, "data": bytes, "size": int, "refs": int},
        pk="id",
        not_null={"digest", "data", "size", "refs"},
    )
    db.table("blobs").create_index(["digest"], unique=True)
    db.table("flows").add_column("content", bytes)
    db.table("flows").add_column("parts", bytes)
    for trigger in ("flows_ai", "flows_ad", "flows_au"):
        db.conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    low, high = db.conn.execute("SELECT coalesce(min(id), 1) - 1, coalesce(max(id), 0) FROM flows").fetchone()
    if high > low:
        db.conn.execute("ALTER TABLE flows_fts RENAME TO flows_fts_legacy")
    else:
        db.conn.execute("DROP TABLE flows_fts")
    db.table("flows_legacy").create({"low": int, "high": int}, not_null={"low", "high"})
    db.conn.execute("INSERT INTO flows_legacy (low, high) VALUES (?, ?)", (low, high))
    db.conn.execute(
        "CREATE VIRTUAL TABLE flows_fts USING fts5(path, model, request_body, response_body, content='', detail=none)"
    )


def _v12_object_clients(db: sqlite_utils.Database) -> None:
    # Tenancy: the client that created each object, besides the key (NULL: made before this
    # version, or upstream directly; only clients allowed legacy objects reach those).
    db.table("object_owners").add_column("client_id", int)
    db.table("object_owners").create_index(["client_id"])
    db.table("clients").add_column("legacy_objects", int, not_null_default=0)


def _v13_replays(db: sqlite_utils.Database) -> None:
    # The workbench (docs/workbench.md): a flow the UI sent again names the flow it replays, and
    # says what became of an admin's pin (a group, a key); what the client sent where keyrotor
    # changed it on the way (JSON: path, headers, the body's top-level changes, the upstream URL);
    # built-in clients (the playground's) that the UI recreates when missing.
    db.table("flows").add_column("replay_of", int)
    db.table("flows").add_column("pin_note", str)
    db.table("flows").add_column("client_request", str)
    db.table("flows").create_index(["replay_of"])
    db.table("clients").add_column("builtin", int, not_null_default=0)


def _v14_attempt_urls(db: sqlite_utils.Database) -> None:
    # Where each attempt of a retried flow went upstream; the flow keeps the client's own path.
    db.table("attempts").add_column("url", str)


def _v15_traces(db: sqlite_utils.Database) -> None:
    # Trace probes (docs/traces.md): one row per trace (trace_id is the unguessable id in the image
    # URL, unique, looked up by the trace listener), and every fetch of its image (bounded per trace).
    db.table("traces").create(
        {
            "id": int,
            "trace_id": str,
            "group_id": int,
            "group_label": str,
            "model": str,
            "created_at": float,
            "sent_at": float,
            "answered_at": float,
            "finished_at": float,
            "status": int,
            "answer_model": str,
            "system_fingerprint": str,
            "answer_text": str,
            "error": str,
            "flow_id": int,
            "scheduled": int,
        },
        pk="id",
        not_null={"trace_id", "group_label", "model", "created_at", "scheduled"},
        defaults={"scheduled": 0},
    )
    db.table("traces").create_index(["trace_id"], unique=True)
    db.table("traces").create_index(["group_id", "created_at"])
    db.table("traces").create_index(["model", "created_at"])
    db.table("traces").create_index(["created_at"])
    db.table("trace_fetches").create(
        {
            "id": int,
            "trace_id": int,
            "at": float,
            "address": str,
            "user_agent": str,
            "headers": str,
            "delay_seconds": float,
        },
        pk="id",
        not_null={"trace_id", "at", "address", "headers"},
        foreign_keys=[("trace_id", "traces", "id")],
    )
    db.table("trace_fetches").create_index(["trace_id"])


def _v16_playground(db: sqlite_utils.Database) -> None:
    # The chat playground (docs/playground.md): conversations and their turns, each turn naming the
    # flow that carried it (mitmproxy's flow id; its row once the writer has stored it).
    db.table("playground_conversations").create(
        {
            "id": str,  # pg-<hex>: also the flows' x-keyrotor-session
            "title": str,  # the first words of the first prompt
            "client_id": int,
            "model": str,
            "group_id": int,
            "system": str,
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
        not_null={"created_at", "updated_at"},
    )
    db.table("playground_conversations").create_index(["updated_at"])
    db.table("playground_turns").create(
        {
            "id": int,
            "conversation_id": str,
            "prompt": str,
            "answer": str,  # NULL: not answered (refused, failed, cut): not sent again
            "error": str,
            "status": int,
            "model": str,
            "stream": int,
            "flow_id": str,  # mitmproxy's, from the proxy's x-keyrotor-flow
            "flows_before": int,  # flows.id was at most this when the turn was sent: where to look for its row
            "flow_row_id": int,
            "created_at": float,
            "ended_at": float,
        },
        pk="id",
        not_null={"conversation_id", "prompt", "created_at"},
        foreign_keys=[("conversation_id", "playground_conversations", "id")],
    )
    db.table("playground_turns").create_index(["conversation_id"])


def _v17_flow_workers(db: sqlite_utils.Database) -> None:
    # `run.py proxy --workers N`: which worker served each flow (NULL: one process).
    db.table("flows").add_column("worker", int)


def _v18_flow_labels_previews_alerts(db: sqlite_utils.Database) -> None:
    # Issue 24: the client's tags and session (x-keyrotor-tags, x-keyrotor-session), short previews of
    # the prompt and the answer (older rows have none), and the alerts the UI process raises.
    for column in ("tags", "session", "prompt_preview", "answer_preview"):
        db.table("flows").add_column(column, str)
    db.conn.execute("CREATE INDEX flows_session ON flows (session) WHERE session IS NOT NULL")
    # One row per tag of a flow: a tag filter reads its flows newest first, not every flow.
    db.conn.execute("CREATE TABLE flow_tags (tag TEXT NOT NULL, flow INTEGER NOT NULL, PRIMARY KEY (tag, flow))")
    db.conn.execute("CREATE INDEX flow_tags_flow ON flow_tags (flow)")
    db.table("alerts").create(
        {
            "id": int,
            "condition": str,  # what is wrong, as a stable key: one open alert per condition
            "kind": str,
            "message": str,
            "details": str,  # JSON object
            "raised_at": float,
            "cleared_at": float,  # NULL while the condition holds
            "sent_at": float,
            "send_error": str,
        },
        pk="id",
        not_null={"condition", "kind", "message", "raised_at"},
    )
    db.conn.execute("CREATE UNIQUE INDEX alerts_open ON alerts (condition) WHERE cleared_at IS NULL")
    # Spend per day reads cost and requests of 30 days of hour rows: from this index, not the wide rows.
    db.conn.execute("CREATE INDEX rollups_hour_spend ON rollups_hour (dimension, bucket, value, requests, cost)")
    db.table("alerts").create_index(["raised_at"])


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1_initial,
    _v2_attempts_and_cost,
    _v3_rollups,
    _v4_rollups_by_dimension,
    _v5_upstream_key_names,
    _v6_attempt_outcomes,
    _v7_upstreams_groups_models,
    _v8_every_endpoint,
    _v9_clients_limits_audit,
    _v10_object_owners,
    _v11_packed_flows,
    _v12_object_clients,
    _v13_replays,
    _v14_attempt_urls,
    _v15_traces,
    _v16_playground,
    _v17_flow_workers,
    _v18_flow_labels_previews_alerts,
]


def migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    db = sqlite_utils.Database(conn)
    for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
        with conn:
            migration(db)
            conn.execute(f"PRAGMA user_version = {number}")
