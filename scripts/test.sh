#!/usr/bin/env bash
# Installs what the tests need, starts the real peers, and runs the whole test suite.
# Usage: scripts/test.sh        (CI calls exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

export VIRTRIGAUD_IT=1          # a missing peer is a failure, not a skip
export CARGO_TERM_COLOR=never
export RUST_BACKTRACE=1
# A one-shot build gains nothing from incremental state, which doubled the size of target/.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

log() { printf '\n== %s\n' "$*"; }
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

# --- system packages ---------------------------------------------------------------------------
# qemu-img/qemu-io/qemu-nbd are the format oracle. The machine ships qemu 10; Debian's
# qemu-utils (7.2) would replace it, so install it only when qemu-img is missing.
command -v curl >/dev/null 2>&1 || apt_install curl
# The reference age binary: decrypts what an encrypted export stored (tests/encryption.rs).
command -v age >/dev/null 2>&1 || apt_install age

# --- peers ---------------------------------------------------------------------------------------
# Each scripts/peers/NAME.sh knows `install`, `start STATE_DIR` (writes STATE_DIR/NAME.env with
# the variables the tests read, and NAME.pid) and `stop STATE_DIR`. All bind to 127.0.0.1 and are
# stopped by PID when this script exits, whatever happened.
STATE=$(mktemp -d /tmp/virtrigaud-peers.XXXXXX)
started=()
stop_peers() {
    for p in "${started[@]}"; do "scripts/peers/$p.sh" stop "$STATE" || true; done
    rm -rf "$STATE"
}
trap stop_peers EXIT
for script in scripts/peers/*.sh; do
    name=$(basename "$script" .sh)
    log "peer $name: install"
    "$script" install
done
# Installing qemu-system-x86 (libvirt peer) removes a newer hand-installed qemu-utils, so check
# for the format oracle only after the peers are installed.
command -v qemu-img >/dev/null 2>&1 || apt_install qemu-utils
qemu-img --version | head -1
for script in scripts/peers/*.sh; do
    name=$(basename "$script" .sh)
    log "peer $name: start"
    started+=("$name")
    "$script" start "$STATE"
    # shellcheck disable=SC1090
    [ -f "$STATE/$name.env" ] && source "$STATE/$name.env"
done

# --- checks --------------------------------------------------------------------------------------
df -h . | tail -1
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings

log "cargo test"
cargo test --workspace --all-features

df -h . | tail -1; du -sh target 2>/dev/null || true
log "quickstart"
cargo run --example quickstart
log "custom backend example (conformance suite + export/import on an in-memory backend)"
cargo run --example custom_backend
