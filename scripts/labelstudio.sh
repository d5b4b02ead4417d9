#!/usr/bin/env bash
# Label Studio 1.23.2 for end-to-end tests and local trials, in its own virtual environment (it pins
# versions that cannot share the project's .venv).
#
#   scripts/labelstudio.sh install            create the venv and a migrated data-dir template (idempotent)
#   scripts/labelstudio.sh run DATA_DIR PORT  run Label Studio in the foreground on 127.0.0.1:PORT; an empty
#                                             DATA_DIR is seeded from the template (restart ~5 s instead of
#                                             ~60 s of migrations)
#   scripts/labelstudio.sh start [PORT]       install, start in the background in a temporary data dir,
#                                             wait for /health, print URL, token and pid
#
# The admin user is admin@example.com with a fixed legacy token ($MAGRAL_LS_TOKEN, 40 hex characters) and
# password ($MAGRAL_LS_PASSWORD); both are baked into the template. Label Studio listens on 127.0.0.1 only.
# Overridable: MAGRAL_LS_VENV (default .cache/ls-venv), MAGRAL_LS_TEMPLATE (.cache/ls-template-1.23.2),
# PYTHON (python3).
set -euo pipefail

LS_VERSION=1.23.2
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LS_VENV="${MAGRAL_LS_VENV:-$REPO/.cache/ls-venv}"
LS_TEMPLATE="${MAGRAL_LS_TEMPLATE:-$REPO/.cache/ls-template-$LS_VERSION}"
LS_USER="admin@example.com"
LS_PASSWORD="${MAGRAL_LS_PASSWORD:-magral-e2e-password}"
LS_TOKEN="${MAGRAL_LS_TOKEN:-0123456789abcdef0123456789abcdef01234567}"
PYTHON="${PYTHON:-python3}"

log() { echo "labelstudio.sh: $*" >&2; }

# Label Studio reads HOST, PORT, USERNAME, PASSWORD, ... with and without its prefix: start from a clean slate.
ls_env() {
    local data_dir="$1" port="$2" name
    unset HOST PORT USERNAME PASSWORD USER_TOKEN DATABASE_NAME DJANGO_DB
    for name in $(compgen -e | grep -E '^(LABEL_STUDIO_|HEARTEX_)' || true); do
        unset "$name"
    done
    export LABEL_STUDIO_BASE_DATA_DIR="$data_dir"
    export LABEL_STUDIO_USERNAME="$LS_USER"
    export LABEL_STUDIO_PASSWORD="$LS_PASSWORD"
    export LABEL_STUDIO_USER_TOKEN="$LS_TOKEN"
    export LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true
    export LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true
    # Both default to blocking an ML backend or webhook on 127.0.0.1, where the tests run theirs.
    export ML_BLOCK_LOCAL_IP=false
    export SSRF_PROTECTION_ENABLED=false
    export LATEST_VERSION_CHECK=false
    export COLLECT_ANALYTICS=false
    export LABEL_STUDIO_HOST="http://127.0.0.1:$port"
    export PYTHONUNBUFFERED=1
}

install_venv() {
    local stamp="$LS_VENV/.magral-label-studio-$LS_VERSION"
    if [[ -f "$stamp" ]]; then
        return 0
    fi
    log "creating $LS_VENV with label-studio==$LS_VERSION (about 2 minutes, 1 GB)"
    rm -rf "$LS_VENV"
    mkdir -p "$(dirname "$LS_VENV")"
    "$PYTHON" -m venv "$LS_VENV"
    "$LS_VENV/bin/pip" install -q --disable-pip-version-check "label-studio==$LS_VERSION"
    touch "$stamp"
}

make_template() {
    if [[ -f "$LS_TEMPLATE/.ready" ]]; then
        return 0
    fi
    log "migrating a fresh data dir into $LS_TEMPLATE (about a minute)"
    local tmp="$LS_TEMPLATE.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    # `init` applies the migrations and creates the admin user with its token, then exits.
    (ls_env "$tmp" 8080 && "$LS_VENV/bin/label-studio" init --quiet --no-browser >"$tmp/init.log" 2>&1) || {
        log "label-studio init failed; last lines of its log:"
        tail -n 20 "$tmp/init.log" >&2 || true
        exit 1
    }
    touch "$tmp/.ready"
    rm -rf "$LS_TEMPLATE"
    mv "$tmp" "$LS_TEMPLATE"
}

install() {
    mkdir -p "$REPO/.cache"
    # One installer at a time (two test sessions starting together).
    exec 9>"$REPO/.cache/labelstudio.lock"
    flock 9
    install_venv
    make_template
    flock -u 9
}

run() {
    local data_dir="$1" port="$2"
    if [[ ! -f "$LS_TEMPLATE/.ready" || ! -f "$LS_VENV/.magral-label-studio-$LS_VERSION" ]]; then
        log "not installed: run '$0 install' first"
        exit 1
    fi
    mkdir -p "$data_dir"
    if [[ ! -e "$data_dir/label_studio.sqlite3" ]]; then
        cp -a "$LS_TEMPLATE/." "$data_dir/"
    fi
    ls_env "$data_dir" "$port"
    exec "$LS_VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 --port "$port"
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local port="${1:-$(free_port)}"
    install
    local data_dir
    data_dir="$(mktemp -d -t magral-ls-XXXXXX)"
    nohup bash "$0" run "$data_dir" "$port" >"$data_dir/server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 120); do
        if curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null; then
            echo "LABEL_STUDIO_URL=http://127.0.0.1:$port"
            echo "LABEL_STUDIO_API_KEY=$LS_TOKEN"
            echo "user=$LS_USER password=$LS_PASSWORD pid=$pid data_dir=$data_dir log=$data_dir/server.log"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            log "Label Studio exited; last lines of $data_dir/server.log:"
            tail -n 20 "$data_dir/server.log" >&2
            exit 1
        fi
        sleep 1
    done
    log "Label Studio did not answer /health within 120 s; stopping pid $pid"
    kill "$pid" 2>/dev/null || true
    exit 1
}

case "${1:-}" in
    install) install ;;
    run)
        [[ $# -eq 3 ]] || { log "usage: $0 run DATA_DIR PORT"; exit 2; }
        run "$2" "$3"
        ;;
    start) start "${2:-}" ;;
    *)
        echo "usage: $0 install | run DATA_DIR PORT | start [PORT]" >&2
        exit 2
        ;;
esac
