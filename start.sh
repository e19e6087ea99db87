#!/usr/bin/env bash
# Installs what keyrotor needs (first run only) and starts the proxy and the UI.
# Any arguments go to `run.py`, e.g. `./start.sh serve --web` or `./start.sh proxy`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
ensure_venv "$KEYROTOR_ROOT/requirements.txt"
# No cd: relative paths in arguments and KEYROTOR_* variables mean the directory you are
# in, exactly as with `.venv/bin/python run.py ...`, so both act on the same database.
exec "$VENV/bin/python" "$KEYROTOR_ROOT/run.py" "${@:-serve}"
