#!/usr/bin/env bash
# Sourced by test.sh: makes sure the container tests (tests/deploy) have an nginx binary.
# The tests start Debian's nginx themselves, with deploy/nginx.conf, on free loopback ports
# in a temporary directory; the package's own service is never started (it is not needed).
# When it cannot be installed, one sentence says why and those tests skip (under CI=true
# they fail: tests/deploy/conftest.py decides that).
# Uses apt_as_root from scripts/install_browser.sh (test.sh sources that first).

NGINX_PACKAGES=(nginx)

nginx_present() {
    [ -n "${KEYROTOR_NGINX:-}" ] && [ -x "$KEYROTOR_NGINX" ] && return 0
    [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1
}

ensure_nginx() {
    nginx_present && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "keyrotor: container tests will be skipped: no nginx found and no apt-get to install Debian's" \
             "nginx package (install nginx yourself and set KEYROTOR_NGINX=/path/to/nginx)." >&2
        return 0
    fi
    if [ "$(id -u)" -ne 0 ] && ! { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
        echo "keyrotor: container tests will be skipped: nginx is missing and installing it needs root or" \
             "passwordless sudo (run 'sudo apt-get install nginx' once, then ./test.sh again)." >&2
        return 0
    fi
    echo "Installing Debian's ${NGINX_PACKAGES[*]} for the container tests"
    local install=(install -y -q --no-install-recommends "${NGINX_PACKAGES[@]}")
    local log
    log="$(mktemp -t keyrotor-apt.XXXXXX)"
    # policy-rc.d 101: the package's install script must not start a system-wide nginx on port 80
    # (the tests start their own); where invoke-rc.d honours it, nothing is left listening.
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ "$(id -u)" -eq 0 ] && [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    if ! apt_as_root "${install[@]}" >"$log" 2>&1; then
        if ! { apt_as_root update -q && apt_as_root "${install[@]}"; } >>"$log" 2>&1; then
            echo "keyrotor: container tests will be skipped: 'apt-get install ${NGINX_PACKAGES[*]}' failed" \
                 "(see $log)." >&2
            [ -n "$made_policy" ] && rm -f "$policy"
            return 0
        fi
    fi
    [ -n "$made_policy" ] && rm -f "$policy"
    rm -f "$log"
}

deploy_tests_deselected() {
    # `./test.sh -m "not deploy"` should not install an nginx it will not use.
    local arg
    for arg in "$@"; do
        case "$arg" in *"not deploy"*) return 0 ;; esac
    done
    return 1
}
