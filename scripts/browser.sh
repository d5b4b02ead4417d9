#!/usr/bin/env bash
# Debian's Chromium and its WebDriver for the browser tests (tests/e2e/test_first_project.py).
#
#   scripts/browser.sh install   apt-get install chromium chromium-driver unless both are installed
#                                (idempotent: a dpkg query, well under a second, when they are); needs root
#   scripts/browser.sh paths     print the browser and driver paths
#
# Nothing is downloaded from outside Debian's archive: selenium is told where both binaries are, so its own
# driver manager never runs.
set -euo pipefail

PACKAGES=(chromium chromium-driver)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "browser.sh: $*" >&2; }

installed() {
    local package
    for package in "${PACKAGES[@]}"; do
        [[ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null)" == "install ok installed" ]] || return 1
    done
}

install() {
    if installed; then
        return 0
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        log "${PACKAGES[*]} missing and not root: run 'sudo apt-get install ${PACKAGES[*]}'"
        exit 1
    fi
    mkdir -p "$REPO/.cache"
    exec 9>"$REPO/.cache/browser.lock"  # one installer at a time
    flock 9
    if ! installed; then
        log "installing ${PACKAGES[*]} (apt-get update first; about a minute)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >&2
    fi
    flock -u 9
}

paths() {
    echo "browser=$(command -v chromium)"
    echo "driver=$(command -v chromedriver)"
}

case "${1:-}" in
    install) install ;;
    paths) paths ;;
    *)
        echo "usage: $0 install | paths" >&2
        exit 2
        ;;
esac
