"""`playground`: ask a model through the proxy as the UI's playground does, and list, show or delete conversations."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time

from cli.common import dollars, when
from config import Settings
from core.playground import Answer
from monitor_ui.playground import Ask, Chat, Refused, prepare_in
from monitor_ui.through_proxy import ProxyTarget
from storage import db
from storage import playground as store

FLOW_WAIT_SECONDS = 10.0


def command(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "ask":
        return asyncio.run(_ask(args, settings))
    conn = db.connect(settings.storage_path)
    try:
        return _kept(conn, args)
    except store.NotFound as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()


def _kept(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    if args.action == "list":
        print(f"{'conversation':<20}  {'updated':<20}  {'turns':>5}  {'model':<24}  title")
        for row in store.list_conversations(conn):
            print(
                f"{row['id']:<20}  {when(row['updated_at']):<20}  {row['turns']:>5}  {row['model']:<24}  {row['title']}"
            )
    elif args.action == "show":
        row = store.conversation(conn, args.conversation_id)
        store.resolve_flows(conn, row["id"])
        print(f"{row['id']}  {row['model']}  {row['title']}")
        if row["system"]:
            print(f"system: {row['system']}")
        for turn in store.turns_with_flows(conn, row["id"]):
            print(f"\n> {turn['prompt']}\n")
            print(turn["answer"] if turn["answer"] is not None else f"[{turn['error'] or 'no answer'}]")
            print(f"  ({_facts(turn)})")
    else:
        turns = store.delete_conversation(conn, args.conversation_id)
        print(f"deleted {args.conversation_id} ({turns} turns; its flows stay)")
    return 0


def _facts(turn: dict) -> str:
    facts = [f"flow #{turn['flow_row_id']}" if turn.get("flow_row_id") else "flow not stored yet"]
    if turn.get("status") is not None:
        facts.append(f"status {turn['status']}")
    if turn.get("total_tokens") is not None:
        facts.append(f"{turn['prompt_tokens'] or 0} in, {turn['completion_tokens'] or 0} out tokens")
    if turn.get("cost") is not None:
        facts.append(dollars(turn["cost"]))
    if turn.get("first_byte_ms") is not None:
        facts.append(f"first byte {turn['first_byte_ms']:.0f} ms")
    if turn.get("duration_ms") is not None:
        facts.append(f"total {turn['duration_ms']:.0f} ms")
    return ", ".join(facts)


async def _ask(args: argparse.Namespace, settings: Settings) -> int:
    target = ProxyTarget.of(settings)
    ask = Ask(
        model=args.model,
        prompt=args.prompt,
        conversation=args.conversation,
        group=args.group,
        client=args.client,
        system=args.system,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        stream=args.stream,
    )
    try:
        prepared = await asyncio.to_thread(prepare_in, target.db_path, ask)
        chat = Chat(target, prepared)
        response = await chat.open()
    except Refused as e:
        print(f"keyrotor: {e.message}", file=sys.stderr)
        return 1
    shown = Answer(stream=chat.is_stream)
    async for chunk in chat.chunks():
        if response.status_code < 400 and shown.stream:
            before = len(shown.text)
            shown.feed(chunk)
            print(shown.text[before:], end="", flush=True)
        else:
            shown.feed(chunk)
    if response.status_code < 400 and not shown.stream:
        print(shown.finish(), end="")
    print()
    turn = await asyncio.to_thread(_recorded, target.db_path, prepared.conversation_id, chat.flow_id)
    if response.status_code >= 400:
        print(f"keyrotor: refused ({response.status_code}): {turn.get('error') if turn else ''}", file=sys.stderr)
    print(f"conversation {prepared.conversation_id}: {_facts(turn or {})}", file=sys.stderr)
    return 0 if response.status_code < 400 else 1


def _recorded(db_path, conversation_id: str, flow_id: str | None) -> dict | None:
    """The turn, with its flow once the proxy's writer has stored it (or after FLOW_WAIT_SECONDS)."""
    deadline = time.monotonic() + FLOW_WAIT_SECONDS
    conn = db.connect(db_path)
    try:
        while True:
            store.resolve_flows(conn, conversation_id)
            turns = [t for t in store.turns_with_flows(conn, conversation_id) if t["flow_id"] == flow_id]
            turn = turns[-1] if turns else None
            if turn is None or turn["flow_row_id"] or not flow_id or time.monotonic() > deadline:
                return turn
            time.sleep(0.1)
    finally:
        conn.close()
