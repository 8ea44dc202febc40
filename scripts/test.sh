#!/usr/bin/env bash
# Everything CI checks: formatting, lints, plug-in builds and every test.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
say "cargo fmt --check"
cargo fmt --all --check
"$ROOT/scripts/build-plugins.sh"
# The AWS tests start their own moto servers; install it once up front.
say "installing the moto AWS emulator"
bash "$ROOT/scripts/moto.sh" install
# The MQTT tests start their own mosquitto brokers (Debian's package).
bash "$ROOT/scripts/mosquitto.sh" install
# The failover tests answer DNS with their own dnsmasq (Debian's dnsmasq-base).
bash "$ROOT/scripts/dnsmasq.sh" install
say "cargo clippy"
cargo clippy --quiet --workspace --all-targets -- -D warnings
say "cargo test"
cargo test --workspace
