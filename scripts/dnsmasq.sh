#!/usr/bin/env bash
# A local authoritative DNS server (Debian's dnsmasq-base) for the failover
# tests and the drill: it answers for the names in DIR/records.conf (cname=,
# txt-record=, host-record= lines) and nothing else.
#
#   scripts/dnsmasq.sh install       apt-get install dnsmasq-base, when it is missing
#   scripts/dnsmasq.sh start DIR     a server on a free 127.0.0.1 port (UDP and TCP);
#                                    prints only the port on stdout
#   scripts/dnsmasq.sh reload DIR    the same server again on the same port, reading
#                                    DIR/records.conf anew (dnsmasq reads cname= only
#                                    at start: SIGHUP does not reload it)
#   scripts/dnsmasq.sh stop DIR
# Answers carry TTL 0. Log: DIR/dnsmasq.log; pid: DIR/dnsmasq.pid.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

dnsmasq_bin() {
    command -v dnsmasq 2>/dev/null || echo /usr/sbin/dnsmasq
}

cmd_install() {
    [[ -x $(dnsmasq_bin) ]] && return 0
    say "installing Debian's dnsmasq-base"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y dnsmasq-base >&2; then
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y dnsmasq-base >&2
    fi
}

# A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both).
free_port() {
    python3 - <<'PY'
import socket
while True:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    port = u.getsockname()[1]
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        t.bind(("127.0.0.1", port))
    except OSError:
        continue
    print(port)
    break
PY
}

launch() {
    local dir=$1 port=$2
    : >"$dir/dnsmasq.log"
    "$(dnsmasq_bin)" --conf-file=/dev/null --conf-file="$dir/records.conf" \
        --port="$port" --listen-address=127.0.0.1 --bind-interfaces \
        --no-resolv --no-hosts --no-poll --local-ttl=0 --user="$(id -un)" \
        --pid-file="$dir/dnsmasq.pid" --log-facility="$dir/dnsmasq.log" >&2 || {
        echo "dnsmasq did not start; its log:" >&2
        cat "$dir/dnsmasq.log" >&2 || true
        exit 1
    }
    wait_for_port 127.0.0.1 "$port" dnsmasq "$dir/dnsmasq.log"
}

cmd_start() {
    local dir=${1:?usage: dnsmasq.sh start DIR}
    cmd_install
    dir=$(cd "$dir" && pwd)
    [[ -f $dir/records.conf ]] || : >"$dir/records.conf"
    local port
    port=$(free_port)
    echo "$port" >"$dir/port"
    launch "$dir" "$port"
}

cmd_stop() {
    local dir=${1:?usage: dnsmasq.sh stop DIR}
    stop_pidfile "$dir/dnsmasq.pid" dnsmasq
}

cmd_reload() {
    local dir=${1:?usage: dnsmasq.sh reload DIR}
    dir=$(cd "$dir" && pwd)
    cmd_stop "$dir"
    launch "$dir" "$(<"$dir/port")"
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    reload) cmd_reload "${2:-}" ;;
    stop) cmd_stop "${2:-}" ;;
    *) echo "usage: $0 install | start DIR | reload DIR | stop DIR" >&2; exit 2 ;;
esac
