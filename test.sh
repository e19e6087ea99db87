#!/usr/bin/env bash
# Installs what the tests need (first run only): Chromium for the browser tests, PostgreSQL
# and Redis for the multi-node tests, nginx for the container tests. Then checks lint,
# formatting (ruff) and types (mypy), and runs the whole suite.
# Any arguments go to pytest, e.g. `./test.sh -k capture -x` or `./test.sh -m "not browser"`.
# The suite runs one pytest-xdist worker per core and one more: its tests spend about a third of their time
# waiting on the servers they start, so a third worker on two cores takes ~18 % off the wall time at the
# same CPU. KEYROTOR_TEST_WORKERS=N sets the number; 0 (or `-n 0`) runs it in this one process.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
source "$KEYROTOR_ROOT/scripts/install_browser.sh"
source "$KEYROTOR_ROOT/scripts/install_services.sh"
source "$KEYROTOR_ROOT/scripts/install_nginx.sh"   # nginx for tests/deploy (deploy/nginx.conf)
ensure_venv "$KEYROTOR_ROOT/requirements-dev.txt"
browser_tests_deselected "$@" || ensure_browser
ensure_services
deploy_tests_deselected "$@" || ensure_nginx
cd "$KEYROTOR_ROOT"
# Lint, formatting and types first: cheap, and CI fails on any. `ruff format .` fixes the formatting.
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# What mypy checks, and how strictly (core/ strict), is in pyproject.toml's [tool.mypy].
"$VENV/bin/mypy"
exec "$VENV/bin/python" -m pytest -n "${KEYROTOR_TEST_WORKERS:-$(($(nproc) + 1))}" "$@"
