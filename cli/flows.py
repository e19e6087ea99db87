"""run.py flows: send a recorded flow again through the running proxy, compare two flows (docs/workbench.md)."""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx

from config import Settings
from monitor_ui.replays import Asked, ReplayRefused, compare, replay
from monitor_ui.through_proxy import ProxyTarget
from storage import db, flows


def command(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "replay":
        return replay_command(args, settings)
    return compare_command(args, settings)


def replay_command(args: argparse.Namespace, settings: Settings) -> int:
    asked = Asked(group=args.group, key=args.key, model=args.model, client=args.client)
    try:
        replayed = asyncio.run(replay(ProxyTarget.of(settings), args.flow_id, asked))
    except ReplayRefused as e:
        print(f"keyrotor: {e.message}")
        return 1
    except httpx.HTTPError as e:
        print(f"keyrotor: the proxy did not answer the replay ({type(e).__name__}): is it running on proxy.port?")
        return 1
    if replayed.id is None:
        print(f"answered {replayed.status}; the new flow ({replayed.flow_id}) was not recorded within 30 s")
        return 1
    print(f"flow {replayed.id}: replay of {replayed.replay_of}, answered {replayed.status}")
    return 0


def compare_command(args: argparse.Namespace, settings: Settings) -> int:
    conn = db.connect(settings.storage_path, readonly=True)
    try:
        a, b = flows.get_flow(conn, args.a), flows.get_flow(conn, args.b)
    finally:
        conn.close()
    if a is None or b is None:
        print(f"keyrotor: no flow with id {args.a if a is None else args.b}")
        return 1
    result = compare(a, b)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2, default=str))
        return 0
    print(f"{'':24} {'#' + str(args.a):>20} {'#' + str(args.b):>20}")
    for fact in result["facts"]:
        mark = " " if fact["same"] else "*"
        print(f"{mark}{fact['name']:23} {_cell(fact['a']):>20} {_cell(fact['b']):>20}")
    text = result["text"]
    if text["a"] is None and text["b"] is None:
        print("text: neither answer has assistant text")
    elif text["identical"]:
        print("text: identical")
    else:
        print(f"text: different ({text['similarity'] * 100:.0f} % in common)")
        print("".join(_marked(run) for run in text["diff"]))
    for side in ("request", "response"):
        for change in result["headers"][side]:
            print(f"{side} header {change['name']}: {change['a']!r} -> {change['b']!r}")
        for change in result["bodies"][side]:
            print(f"{side} body {change['path'] or '(whole)'}: {change['kind']}")
    return 0


def _cell(value: object) -> str:
    return "-" if value is None else str(value)[:20]


def _marked(run: dict) -> str:
    if run["op"] == "same":
        return run["text"]
    return f"[-{run['text']}-]" if run["op"] == "removed" else f"{{+{run['text']}+}}"
