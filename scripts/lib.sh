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
