"""`traces run UPSTREAM/GROUP MODEL` and `traces list`: trace probes from the command line (docs/traces.md)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import sys
import time

from config import Settings
from monitor_ui import tracer
from monitor_ui.trace_listener import listener_for
from storage import db, routes
from storage import traces as trace_store


def command(args: argparse.Namespace, settings: Settings) -> int:
    return run(args, settings) if args.action == "run" else list_traces(args, settings)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one trace and print its verdict, after the answer and trace.grace_seconds.

    The image is served by the running UI's trace listener; when none listens on trace.port,
    this command serves it itself while the trace runs."""
    conn = db.connect(settings.storage_path)
    try:
        trace, client_id = tracer.start(conn, settings, args.label, args.model)
    except tracer.TracesOff as e:
        print(f"keyrotor: {e}", file=sys.stderr)
        return 2
    finally:
        conn.close()
    asyncio.run(_serve_and_complete(settings, trace, client_id))
    conn = db.connect(settings.storage_path, readonly=True)
    try:
        shown = tracer.described(conn, trace_store.get(conn, int(trace["id"])) or trace, settings)
    finally:
        conn.close()
    print("\n".join(tracer.verdict_lines(shown)), flush=True)
    return 0


async def _serve_and_complete(settings: Settings, trace: dict, client_id: int) -> None:
    listener = listener_for(settings)
    try:
        await listener.start()
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        # Taken: the running UI serves trace images on that port (close() below does nothing).
    try:
        await tracer.complete(settings, trace, client_id)
    finally:
        await listener.close()


def list_traces(args: argparse.Namespace, settings: Settings) -> int:
    """Traces newest first: id, when, group, model, verdict."""
    conn = db.connect(settings.storage_path, readonly=True)
    try:
        group_id = routes.group_id_of(conn, args.group) if args.group else None
        rows = trace_store.listing(conn, group_id=group_id, model=args.model, limit=100)
        shown = [tracer.described(conn, row) for row in rows]
    finally:
        conn.close()
    if not shown:
        print("no traces")
        return 0
    for t in shown:
        v = t["verdict"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t["created_at"]))
        model = f" (answer names {v['model']})" if v["model_differs"] else ""
        print(f"#{t['id']}  {when}  {t['group']}  {t['model']}{model}  {v['summary']}")
    return 0
