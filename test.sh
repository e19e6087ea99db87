#!/usr/bin/env bash
# Installs what the tests need (first run only) and runs the whole suite.
# Any arguments go to pytest, e.g. `./test.sh -k capture -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
ensure_venv "$KEYROTOR_ROOT/requirements-dev.txt"
cd "$KEYROTOR_ROOT"
exec "$VENV/bin/python" -m pytest "$@"
