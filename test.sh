#!/usr/bin/env bash
# Installs what the tests need (first run only), Chromium for the browser tests
# included, and runs the whole suite.
# Any arguments go to pytest, e.g. `./test.sh -k capture -x` or `./test.sh -m "not browser"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
source "$KEYROTOR_ROOT/scripts/install_browser.sh"
ensure_venv "$KEYROTOR_ROOT/requirements-dev.txt"
browser_tests_deselected "$@" || ensure_browser
cd "$KEYROTOR_ROOT"
exec "$VENV/bin/python" -m pytest "$@"
