#!/usr/bin/env bash
# What the test suite needs from the machine, installed when missing (as root, from Debian's
# packages) or named in one line (otherwise). `make test` runs it before the tests.
#
#   tests/tools/require.sh            # check, and install what is missing when root
#   tests/tools/require.sh --check    # check only (exit 1 and one line if anything is missing)
#
# Each line below: a command the tests run, and the Debian package that brings it.
#   prometheus, promtool  prometheus   a real Prometheus scrapes the agent and the service;
#                                      promtool lints metrics and tests the alert rules
#   prometheus-alertmanager, amtool
#                         prometheus-alertmanager
#                                      a real Alertmanager delivers the alerts to a webhook;
#                                      amtool checks its config and routes
#   ip, tc                iproute2     emulated hosts: network namespaces, veth, tc tbf
#   nft                   nftables     packet loss on an emulated host's link
#   chromium              chromium     the --html report loaded headless: no console error,
#                                      every plot drawn, nothing fetched; docs/report.png
#   c++, ninja, Python.h  g++ ninja-build python3-dev
#                                      the native hot path is built against the installed
#                                      torch (torch.utils.cpp_extension) and tested on real jobs
set -euo pipefail
NEEDS=(
    "/usr/bin/prometheus prometheus"
    "promtool prometheus"
    "/usr/bin/prometheus-alertmanager prometheus-alertmanager"
    "amtool prometheus-alertmanager"
    "ip iproute2"
    "tc iproute2"
    "nft nftables"
    "chromium chromium"
    "c++ g++"
    "ninja ninja-build"
)
# Python's headers, for the interpreter the tests run on (PYTHON, as in the Makefile).
PY=${PYTHON:-python3}
check_only=0
[ "${1:-}" = "--check" ] && check_only=1

missing_packages() {
    local entry cmd pkg out=()
    for entry in "${NEEDS[@]}"; do
        cmd=${entry% *}
        pkg=${entry#* }
        if ! command -v "$cmd" >/dev/null 2>&1; then
            out+=("$pkg")
        fi
    done
    if ! "$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
            2>/dev/null; then
        out+=("python3-dev")
    fi
    if [ ${#out[@]} -gt 0 ]; then printf "%s\n" "${out[@]}" | sort -u | xargs; fi
}

missing=$(missing_packages)
[ -z "$missing" ] && exit 0
if [ "$check_only" = 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing what the tests need: $missing" >&2
    # Prometheus and Alertmanager from Debian would start system services on :9090 and :9093
    # where an init system runs; the tests start their own on free loopback ports, so no
    # recommends (node exporter) either.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # shellcheck disable=SC2086  # one word per package
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    missing=$(missing_packages)
    [ -z "$missing" ] && exit 0
fi
echo "the tests need the Debian package(s) $missing: install them" \
     "(sudo apt-get install $missing) and run make test again" >&2
exit 1
