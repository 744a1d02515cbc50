#!/usr/bin/env bash
# Installs what the tests need, starts the real peers, and runs the whole test suite.
# Usage: scripts/test.sh        (CI calls exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

export VIRTRIGAUD_IT=1          # a missing peer is a failure, not a skip
export CARGO_TERM_COLOR=never
export RUST_BACKTRACE=1

log() { printf '\n== %s\n' "$*"; }

# --- system packages ---------------------------------------------------------------------------
# qemu-img/qemu-io/qemu-nbd are the format oracle. The machine ships qemu 10; Debian's
# qemu-utils (7.2) would replace it, so install it only when qemu-img is missing.
apt_pkgs=()
command -v qemu-img >/dev/null 2>&1 || apt_pkgs+=(qemu-utils)
if ((${#apt_pkgs[@]})); then
    log "installing ${apt_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}"
fi
qemu-img --version | head -1

# --- peers ---------------------------------------------------------------------------------------
# (none yet: the filesystem backend and the local provider need no server)

# --- checks --------------------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings

log "cargo test"
cargo test --workspace --all-features

log "quickstart"
cargo run --example quickstart
