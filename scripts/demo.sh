#!/usr/bin/env bash
# The demo: builds the host and the plug-ins, then dry-runs the demo pipeline
# (all four plug-ins) over the example events and prints the planned AWS calls.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
"$ROOT/scripts/build-plugins.sh"
say "building iotdr"
cargo build --quiet -p iotdr
say "iotdr run pipelines/demo.toml --dry-run --until-idle"
"$CARGO_TARGET_DIR/debug/iotdr" run pipelines/demo.toml --dry-run --until-idle
