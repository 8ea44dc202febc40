#!/usr/bin/env bash
# The DR drill, full form: builds iotdr and the drill, installs the backends
# (moto, mosquitto, dnsmasq) when missing, and runs it. Extra arguments go to
# the drill (`--help` lists them). Files and logs: target/drill/.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
cd "$ROOT"
bash scripts/moto.sh install
bash scripts/mosquitto.sh install
bash scripts/dnsmasq.sh install
say "building iotdr and the drill"
cargo build --quiet -p iotdr -p iotdr-drill
rm -rf target/drill
exec "$CARGO_TARGET_DIR/debug/drill" --iotdr "$CARGO_TARGET_DIR/debug/iotdr" --dir target/drill "$@"
