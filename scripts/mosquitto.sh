#!/usr/bin/env bash
# A mosquitto broker (Debian's package) with mutual TLS, for the MQTT tests.
#
#   scripts/mosquitto.sh install      apt-get install mosquitto, when it is missing
#   scripts/mosquitto.sh start DIR    certificates made in DIR when missing (ca.crt,
#                                     server.*, client.crt/client.key), a broker on a
#                                     free 127.0.0.1 port with its persistence in DIR;
#                                     prints only the port on stdout. MOSQUITTO_ADDRESS
#                                     and MOSQUITTO_PORT choose another address (the
#                                     server certificate is good for 127.0.0.1 and
#                                     127.0.0.2) and port; certificates copied into DIR
#                                     first are used as they are (two brokers, one CA)
#   scripts/mosquitto.sh stop DIR     stops the broker started in DIR
#   scripts/mosquitto.sh restart DIR [--forget-sessions]
#                                     the same broker again, on the same port; with
#                                     --forget-sessions its persistence is wiped first
#                                     (as a broker that lost its state)
# Log: DIR/mosquitto.log; pid: DIR/mosquitto.pid.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cmd_install() {
    command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] && return 0
    say "installing Debian's mosquitto"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto >&2; then
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto >&2
    fi
}

# A CA, a server certificate for localhost, 127.0.0.1 and 127.0.0.2, and a client certificate (P-256).
make_certificates() {
    local dir=$1
    [[ -f $dir/client.key ]] && return 0
    (
        cd "$dir"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3 \
            -keyout ca.key -out ca.crt -subj /CN=iotdr-test-ca \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
        for who in server client; do
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                -keyout "$who.key" -out "$who.csr" -subj "/CN=iotdr-test-$who"
        done
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:127.0.0.2\nextendedKeyUsage=serverAuth\n' >server.ext
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        for who in server client; do
            openssl x509 -req -in "$who.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3 \
                -out "$who.crt" -extfile "$who.ext"
        done
    ) >/dev/null 2>&1 || { echo "openssl could not make the test certificates in $dir" >&2; exit 1; }
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cmd_start() {
    local dir=${1:?usage: mosquitto.sh start DIR}
    cmd_install
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    make_certificates "$dir"
    local port=${MOSQUITTO_PORT:-} address=${MOSQUITTO_ADDRESS:-127.0.0.1}
    [[ -n $port ]] || port=$(free_port)
    mkdir -p "$dir/data"
    cat >"$dir/mosquitto.conf" <<CONF
per_listener_settings false
allow_anonymous false
persistence true
persistence_location $dir/data/
max_queued_messages 100000
pid_file $dir/mosquitto.pid
log_dest file $dir/mosquitto.log
user $(id -un)
listener $port $address
cafile $dir/ca.crt
certfile $dir/server.crt
keyfile $dir/server.key
require_certificate true
use_identity_as_username true
CONF
    launch "$dir" "$port" "$address"
}

# Starts the broker configured in DIR and waits until ADDRESS:PORT answers.
launch() {
    local dir=$1 port=$2 address=$3 mosquitto
    mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
    "$mosquitto" -c "$dir/mosquitto.conf" -d
    wait_for_port "$address" "$port" mosquitto "$dir/mosquitto.log"
}

cmd_restart() {
    local dir=${1:?usage: mosquitto.sh restart DIR [--forget-sessions]} port address
    dir=$(cd "$dir" && pwd)
    port=$(sed -n 's/^listener \([0-9]*\) .*/\1/p' "$dir/mosquitto.conf")
    address=$(sed -n 's/^listener [0-9]* \(.*\)$/\1/p' "$dir/mosquitto.conf")
    cmd_stop "$dir"
    # The broker's persistence is its sessions and their queued messages.
    [[ ${2:-} == --forget-sessions ]] && rm -rf "${dir:?}/data" && mkdir -p "$dir/data"
    launch "$dir" "$port" "$address"
}

cmd_stop() {
    local dir=${1:?usage: mosquitto.sh stop DIR}
    stop_pidfile "$dir/mosquitto.pid" mosquitto
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop "${2:-}" ;;
    restart) cmd_restart "${2:-}" "${3:-}" ;;
    *) echo "usage: $0 install | start DIR | stop DIR | restart DIR [--forget-sessions]" >&2; exit 2 ;;
esac
