# Shared by the project's scripts: paths, the build cache, the wasm target.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# One build cache for every checkout on this machine keeps rebuilds warm;
# a fresh machine simply starts it empty.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/iotdr-target}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_wasm_target() {
    if ! rustup target list --installed | grep -qx wasm32-wasip2; then
        say "installing the wasm32-wasip2 Rust target"
        rustup target add wasm32-wasip2
    fi
}

# Stops the process whose pid is in PIDFILE if it is still NAME (a pid file
# can outlive its process, and the pid be reused): SIGTERM, up to 5 s, then
# SIGKILL. Removes the pid file.
stop_pidfile() {
    local pidfile=$1 name=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && grep -qa "$name" "/proc/$pid/cmdline" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
            sleep 0.1
        fi
    fi
    rm -f "$pidfile"
}

# Waits up to 5 s until ADDRESS:PORT accepts a TCP connection, then prints
# PORT; otherwise says so with LOG (the server's log) and exits.
wait_for_port() {
    local address=$1 port=$2 what=$3 log=$4
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/$address/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
        sleep 0.05
    done
    echo "$what did not answer on $address:$port; its log:" >&2
    cat "$log" >&2 || true
    exit 1
}
