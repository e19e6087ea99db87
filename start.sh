#!/usr/bin/env bash
# Installs what keyrotor needs (first run only) and starts the proxy and the UI.
# Any arguments go to `run.py`, e.g. `./start.sh serve --web` or `./start.sh proxy`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
ensure_venv "$KEYROTOR_ROOT/requirements.txt"
cd "$KEYROTOR_ROOT"
exec "$VENV/bin/python" run.py "${@:-serve}"
