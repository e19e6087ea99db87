"""`alerts`: send a test alert to the webhook (`test`), or show the alerts (`list`)."""

from __future__ import annotations

import argparse

from cli.common import when
from config import Settings
from monitor_ui.alerting import Alerting, receiver_of
from storage import alerts, db


def command(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "test":
        url = settings.alerts.webhook_url
        if not url:
            print("No webhook: set [alerts] webhook_url in config.toml (or KEYROTOR_ALERTS_WEBHOOK_URL).")
            return 1
        delivery = Alerting(settings.storage_path, settings.alerts).send_test()
        if delivery.ok:
            print(f"Test alert sent to {receiver_of(url)} (try {delivery.attempts}).")
            return 0
        print(
            f"The test alert could not be sent to {receiver_of(url)} after {delivery.attempts} tries: {delivery.error}."
        )
        return 1
    conn = db.connect(settings.storage_path, readonly=True)
    try:
        shown = alerts.recent_alerts(conn)
    finally:
        conn.close()
    if not shown:
        print("No alerts raised yet.")
    for alert in shown:
        state = f"cleared {when(alert['cleared_at'])}" if alert["cleared_at"] else "OPEN"
        print(f"{when(alert['raised_at'])}  {state:<28} {alert['kind']:<15} {alert['message']}")
    return 0
