#!/usr/bin/env bash
# Sourced by test.sh: makes sure the servers the multi-node tests start are on the machine:
# Debian's postgresql (PostgreSQL 15 on bookworm) and redis-server. The tests start each on a
# free loopback port in a temporary directory and stop it after (tests/services.py); nothing
# here starts a service. When they cannot be installed, one sentence says why and those tests
# skip (under CI=true they fail: tests/services.py decides that).
# apt_as_root comes from scripts/install_browser.sh, sourced before this file.

SERVICE_PACKAGES=(postgresql redis-server)

services_present() {
    command -v redis-server >/dev/null 2>&1 && compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

ensure_services() {
    services_present && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "keyrotor: PostgreSQL and Redis tests will be skipped: no apt-get to install Debian's" \
             "${SERVICE_PACKAGES[*]} packages (install them yourself)." >&2
        return 0
    fi
    if [ "$(id -u)" -ne 0 ] && ! { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
        echo "keyrotor: PostgreSQL and Redis tests will be skipped: installing ${SERVICE_PACKAGES[*]} needs" \
             "root or passwordless sudo (run 'sudo apt-get install ${SERVICE_PACKAGES[*]}' once)." >&2
        return 0
    fi
    echo "Installing Debian's ${SERVICE_PACKAGES[*]} for the PostgreSQL and Redis tests"
    local install=(install -y -q --no-install-recommends "${SERVICE_PACKAGES[@]}")
    local log
    log="$(mktemp -t keyrotor-apt.XXXXXX)"
    # policy-rc.d 101: the packages' install scripts must not start a system-wide server (the
    # tests start their own); where invoke-rc.d honours it, nothing is left listening on 5432/6379.
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ "$(id -u)" -eq 0 ] && [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    if ! apt_as_root "${install[@]}" >"$log" 2>&1; then
        if ! { apt_as_root update -q && apt_as_root "${install[@]}"; } >>"$log" 2>&1; then
            echo "keyrotor: PostgreSQL and Redis tests will be skipped: 'apt-get install" \
                 "${SERVICE_PACKAGES[*]}' failed (see $log)." >&2
            [ -n "$made_policy" ] && rm -f "$policy"
            return 0
        fi
    fi
    [ -n "$made_policy" ] && rm -f "$policy"
    rm -f "$log"
}
