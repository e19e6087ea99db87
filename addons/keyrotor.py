"""The script mitmproxy loads: `mitmdump -s addons/keyrotor.py --mode reverse:https://api.openai.com`.

Addon order is the order of decisions: who is calling, whether what they send is within
bounds, which key, what else to ask upstream for (token usage), what happened; then,
when stopping, whether anything is still in flight. This is the only module that
imports the other addons: it wires them together, each given what it uses by the one
Runtime (addons/runtime.py), the composition root.
Option defaults come from config.toml and KEYROTOR_* variables, so plain mitmdump
behaves like `run.py proxy`; run.py passes its resolved settings with --set.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from addons import patches
from addons.access import Access
from addons.admin_key_watch import AdminKeyWatch
from addons.bounds import Bounds
from addons.capture import Capture
from addons.credential_sender import CredentialSender
from addons.keypool import KeyPool
from addons.memory import Memory
from addons.models import Models
from addons.models_merge import ModelsMerge
from addons.otel import Otel
from addons.realtime import Realtime
from addons.recovery import Recovery
from addons.retry_stream import RetryStream
from addons.runtime import Runtime
from addons.shutdown import Shutdown
from addons.spend import Spend
from addons.tags import Tags
from addons.tenancy import Tenancy
from addons.tenant_lists import TenantLists
from addons.upkeep import Upkeep
from addons.upstream_watch import UpstreamWatch
from addons.usage import Usage
from config import ConfigError, Settings, load_settings
from storage import db, secrets

patches.install()  # mitmproxy's internals that keyrotor replaces, in order, before any addon loads

log = logging.getLogger(__name__)


class KeyRotor:
    """Owns the settings every keyrotor addon shares: where the database is."""

    def __init__(self, defaults: Settings) -> None:
        self._defaults = defaults

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "keyrotor_storage",
            str,
            str(self._defaults.storage_path),
            "Path of keyrotor's SQLite database; secrets are kept beside it.",
        )

    def configure(self, updated: set[str]) -> None:
        if "keyrotor_storage" in updated:
            path = Path(ctx.options.keyrotor_storage)
            try:
                db.ensure_database(path)
            except OSError as e:
                raise exceptions.OptionsError(str(e)) from None
            try:
                admin_key = secrets.ensure_admin_key(path)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
            if admin_key:
                log.warning("Generated the admin key (shown once, keep it): %s", admin_key)

    def running(self) -> None:
        # lazy: an unreachable upstream becomes a 502 plus an error hook (eager gives an
        # empty reply), and requests answered locally never open an upstream connection.
        ctx.options.update(connection_strategy="lazy")


try:
    _settings = load_settings()
except ConfigError as e:
    raise SystemExit(f"keyrotor: {e}") from None

# storage's ports (SQLite, or PostgreSQL with storage.url; through Redis too with [redis] url), the state
# snapshot, the writer, the Governor: one each
_runtime = Runtime(storage_url=_settings.storage.url, redis_url=_settings.redis.url)
_sender = CredentialSender()  # the key pool's: it puts the pool's keys on the wire
_streamer = RetryStream(_sender)  # the key pool's: it feeds a retried stream to the client as it comes
_state, _writer, _governor = _runtime.state, _runtime.writer, _runtime.governor
addons = [
    KeyRotor(_settings),
    Recovery(),
    Access(_settings, _state, _governor, _runtime.admin_keys),  # the admin keys' store signs the UI's passes
    Tags(),  # right after Access: the label headers never go further than keyrotor
    Bounds(_settings),
    Tenancy(_state, _writer),  # before the key pool: another client's object is refused before a key is picked
    Models(_state),  # before the key pool: a list answered here takes no key
    KeyPool(_settings, sender=_sender, state=_state, writer=_writer, streamer=_streamer),
    ModelsMerge(_state),  # right after the key pool: upstream's list, retried or not, gets ours added
    _streamer,  # after the key pool: its error hook stops reading a fed stream the client left
    TenantLists(_state),  # after the key pool too: a list shows the caller only its own objects
    _sender,
    UpstreamWatch(),  # after the key pool: its request hook starts the attempt's clock as the request leaves
    Spend(_governor),  # before Usage: its stream callable sees the usage chunk Usage then takes out
    # OpenTelemetry, only when configured (docs/otel.md): after the key pool (the first attempt's traceparent),
    # before Usage (its stream callable sees the usage chunk Usage takes out).
    *([Otel(_settings.otel, _state)] if _settings.otel.endpoint else []),
    Realtime(_governor, _state),  # charges sessions as responses end; closes them when the client may not go on
    Usage(),
    Capture(_settings, _writer),
    Memory(),  # after capture: a large flow's body is in the writer's hands when it is let go
    AdminKeyWatch(_runtime.admin_keys),
    Upkeep(_state, _writer),
    Shutdown(_settings),  # last with flow hooks: a flow has finished once every addon before it is done with it
    _runtime,  # its done stops the writer after every other addon's done has queued its last rows
]
