#!/usr/bin/env bash
# Builds every plug-in as a WebAssembly component into plugins/dist/ (and the
# test plug-ins into tests/plugins/dist/).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_wasm_target
PLUGINS=(attribute-filter attribute-transform region-router policy-mapper)
TEST_PLUGINS=(hostile future-major)
say "building plug-ins for wasm32-wasip2"
args=()
for p in "${PLUGINS[@]}" "${TEST_PLUGINS[@]}"; do args+=(-p "$p"); done
cargo build --quiet --profile plugin --target wasm32-wasip2 "${args[@]}"
mkdir -p "$ROOT/plugins/dist" "$ROOT/tests/plugins/dist"
for p in "${PLUGINS[@]}"; do
    cp "$CARGO_TARGET_DIR/wasm32-wasip2/plugin/${p//-/_}.wasm" "$ROOT/plugins/dist/$p.wasm"
done
for p in "${TEST_PLUGINS[@]}"; do
    cp "$CARGO_TARGET_DIR/wasm32-wasip2/plugin/${p//-/_}.wasm" "$ROOT/tests/plugins/dist/$p.wasm"
done
