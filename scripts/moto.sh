#!/usr/bin/env bash
# The moto server (a local AWS fake) that the SDK tests talk to.
#
#   scripts/moto.sh install        venv at $ROOT/.venv with moto[server]==$MOTO_VERSION
#   scripts/moto.sh start [PORT]   start it on 127.0.0.1 (a free port if none given);
#                                  prints only http://127.0.0.1:PORT on stdout
#   scripts/moto.sh stop [PORT]    stop the one on PORT, or every one start started
#
# Usage from a test script:
#   MOTO=$(scripts/moto.sh start); trap 'scripts/moto.sh stop "${MOTO##*:}"' EXIT
# Logs: $ROOT/.venv/moto-PORT.log; pid: $ROOT/.venv/moto-PORT.pid.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MOTO_VERSION=5.2.5
VENV=$ROOT/.venv
PY=$VENV/bin/python

moto_installed() {
    [[ -x $PY ]] && "$PY" - "$MOTO_VERSION" 2>/dev/null <<'EOF'
import sys
from importlib.metadata import version
# The server extra's own packages must be there too, not just moto.
sys.exit(0 if version("moto") == sys.argv[1] and version("flask") and version("flask-cors") else 1)
EOF
}

make_venv() {
    local py=${PYTHON:-python3}
    if "$py" -m venv "$VENV" >&2; then
        return
    fi
    # Debian's own python3 ships venv without ensurepip unless python3-venv is installed.
    say "python3 -m venv failed; installing Debian's python3-venv"
    rm -rf "$VENV/bin" "$VENV/lib" "$VENV/lib64" "$VENV/include" "$VENV/pyvenv.cfg"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >&2
    # That package serves Debian's python3, which may not be the one on PATH.
    "$py" -m venv "$VENV" >&2 || /usr/bin/python3 -m venv "$VENV" >&2
}

cmd_install() {
    moto_installed && return 0
    mkdir -p "$VENV"
    # Two tests starting at once must not both install into the same venv.
    exec 9>"$VENV/.install.lock"
    flock 9
    if ! moto_installed; then
        if [[ ! -x $PY ]] || ! "$PY" -c 'import pip' 2>/dev/null; then
            say "creating $VENV"
            make_venv
        fi
        say "installing moto[server]==$MOTO_VERSION into $VENV"
        "$PY" -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
        moto_installed || { echo "moto $MOTO_VERSION did not install" >&2; exit 1; }
    fi
    exec 9>&-
}

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The pid in a pid file, if that process is still a moto_server.
live_pid() {
    local file=$1 pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && grep -qa moto_server "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

answers() {
    # Python, not curl: the venv is there by now and curl may not be.
    "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$1/moto-api/" 2>/dev/null
}

cmd_start() {
    cmd_install
    local port=${1:-} pidfile log pid
    [[ -n $port ]] || port=$(free_port)
    [[ $port =~ ^[0-9]+$ ]] || { echo "bad port: $port" >&2; exit 2; }
    pidfile=$VENV/moto-$port.pid
    log=$VENV/moto-$port.log
    if pid=$(live_pid "$pidfile") && answers "$port"; then
        say "moto already running on port $port (pid $pid)"
        echo "http://127.0.0.1:$port"
        return 0
    fi
    if answers "$port"; then
        echo "port $port is already taken by something else" >&2
        exit 1
    fi
    say "starting moto $MOTO_VERSION on 127.0.0.1:$port (log: $log)"
    # Nothing of the server may hold our stdout: callers capture it with $(...).
    setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" </dev/null >"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$pidfile"
    local i
    for ((i = 0; i < 300; i++)); do
        if answers "$port"; then
            echo "http://127.0.0.1:$port"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$pidfile"
            echo "moto_server exited; last lines of $log:" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "moto_server did not answer on port $port within 30 s; last lines of $log:" >&2
    tail -n 20 "$log" >&2
    kill "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    exit 1
}

stop_one() {
    local pidfile=$1 pid i
    if pid=$(live_pid "$pidfile"); then
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        say "stopped moto (pid $pid, ${pidfile##*/})"
    fi
    rm -f "$pidfile"
}

cmd_stop() {
    if [[ -n ${1:-} ]]; then
        stop_one "$VENV/moto-$1.pid"
    else
        local f
        for f in "$VENV"/moto-*.pid; do
            [[ -e $f ]] && stop_one "$f"
        done
    fi
    return 0
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start "${2:-}" ;;
stop) cmd_stop "${2:-}" ;;
*)
    sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
    ;;
esac
