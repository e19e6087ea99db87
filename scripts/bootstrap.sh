#!/usr/bin/env bash
# Sourced by start.sh and test.sh: finds a Python 3.12+ interpreter, creates
# .venv beside the repository, installs the given requirements file into it, then
# keyrotor itself, editable (pyproject.toml): its modules import from this checkout.
# Re-running is cheap: pip runs again only when a requirements file or pyproject.toml changed.
set -euo pipefail

KEYROTOR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$KEYROTOR_ROOT/.venv"

python_is_recent() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    # An explicit choice wins; then whatever is on PATH; then the usual places
    # interpreters live when they are not on PATH (pyenv, uv, deadsnakes, brew).
    local candidates=()
    [ -n "${KEYROTOR_PYTHON:-}" ] && candidates+=("$KEYROTOR_PYTHON")
    candidates+=(python3.13 python3.12 python3.14 python3 python)
    local dir
    for dir in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]* \
               "$HOME"/.local/share/uv/python/cpython-3.1[2-9]* \
               /usr/local/bin /usr/bin /opt/homebrew/bin; do
        for exe in "$dir"/bin/python3 "$dir"/python3.13 "$dir"/python3.12; do
            [ -x "$exe" ] && candidates+=("$exe")
        done
    done
    local candidate
    for candidate in "${candidates[@]}"; do
        if command -v "$candidate" >/dev/null 2>&1 && python_is_recent "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

ensure_venv() {
    local requirements="$1"
    if [ ! -x "$VENV/bin/python" ] || ! python_is_recent "$VENV/bin/python"; then
        local python
        if ! python="$(find_python)"; then
            echo "keyrotor needs Python 3.12 or newer (mitmproxy 12 does): install one (e.g. 'pyenv install 3.12'" \
                 "or your distribution's python3.12 package) or point KEYROTOR_PYTHON at it." >&2
            exit 1
        fi
        echo "Creating $VENV with $python ($("$python" --version 2>&1))"
        rm -rf "$VENV"
        "$python" -m venv "$VENV"
    fi
    local stamp="$VENV/.installed-$(basename "$requirements")"
    local digest
    digest="$(cat "$KEYROTOR_ROOT/requirements.txt" "$requirements" "$KEYROTOR_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
        echo "Installing $(basename "$requirements") into $VENV"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$requirements"
        # --no-deps: they are requirements.txt's, just installed.
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps -e "$KEYROTOR_ROOT"
        echo "$digest" > "$stamp"
    fi
}
