#!/usr/bin/env bash
# Sourced by test.sh: makes sure the browser tests (tests/browser) have a Chromium.
# Playwright cannot download its own browser on every machine we run on, so the
# tests drive Debian's `chromium` package instead, installed here when missing.
# When it cannot be installed, one sentence says why and the browser tests skip
# (under CI=true they fail: tests/browser/conftest.py decides that).

CHROMIUM_PACKAGES=(chromium chromium-driver)  # the driver is what the project brief names; Playwright needs only chromium

chromium_present() {
    [ -n "${KEYROTOR_CHROMIUM:-}" ] && [ -x "$KEYROTOR_CHROMIUM" ] && return 0
    { [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; } && command -v chromedriver >/dev/null 2>&1
}

apt_as_root() {
    # Root runs apt-get directly; anyone else only through passwordless sudo.
    if [ "$(id -u)" -eq 0 ]; then
        env DEBIAN_FRONTEND=noninteractive apt-get "$@"
    else
        sudo -n env DEBIAN_FRONTEND=noninteractive apt-get "$@"
    fi
}

ensure_browser() {
    chromium_present && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "keyrotor: browser tests will be skipped: no Chromium found and no apt-get to install Debian's" \
             "chromium package (install Chromium yourself and set KEYROTOR_CHROMIUM=/path/to/chromium)." >&2
        return 0
    fi
    if [ "$(id -u)" -ne 0 ] && ! { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
        echo "keyrotor: browser tests will be skipped: Chromium is missing and installing it needs root or" \
             "passwordless sudo (run 'sudo apt-get install chromium' once, then ./test.sh again)." >&2
        return 0
    fi
    echo "Installing Debian's ${CHROMIUM_PACKAGES[*]} for the browser tests"
    local install=(install -y -q --no-install-recommends "${CHROMIUM_PACKAGES[@]}")
    local log
    log="$(mktemp -t keyrotor-apt.XXXXXX)"
    # The package lists are refreshed only when the install fails without it: usually they are recent enough.
    if ! apt_as_root "${install[@]}" >"$log" 2>&1; then
        if ! { apt_as_root update -q && apt_as_root "${install[@]}"; } >>"$log" 2>&1; then
            echo "keyrotor: browser tests will be skipped: 'apt-get install ${CHROMIUM_PACKAGES[*]}' failed" \
                 "(see $log)." >&2
            return 0
        fi
    fi
    rm -f "$log"
}

browser_tests_deselected() {
    # `./test.sh -m "not browser"` should not install a browser it will not use.
    local arg
    for arg in "$@"; do
        case "$arg" in *"not browser"*) return 0 ;; esac
    done
    return 1
}
