#!/usr/bin/env bash
# Whole-migration benchmark (issue: a whole migration at the speed of its slowest component):
# builds the CLI in release, starts the libvirt peer unless VIRTRIGAUD_LIBVIRT_URI is set, and
# runs scripts/bench-migration.py. See benches/README.md.
#   scripts/bench-migration.sh [4/1 10/3 ...]     (VIRTUAL_GIB/DATA_GIB; rounds: VRG_BENCH_ROUNDS)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
[ -x /usr/bin/time ] || apt_install time
if [ -z "${VIRTRIGAUD_LIBVIRT_URI:-}" ]; then
    scripts/peers/libvirt.sh install
    # Installing qemu-system-x86 removes a newer hand-installed qemu-utils: check after it, and
    # before libvirtd starts (it looks up qemu-img once, at start).
    command -v qemu-img >/dev/null 2>&1 || apt_install qemu-utils
    STATE=$(mktemp -d /tmp/virtrigaud-bench.XXXXXX)
    trap 'scripts/peers/libvirt.sh stop "$STATE"; rm -rf "$STATE"' EXIT
    scripts/peers/libvirt.sh start "$STATE"
    source "$STATE/libvirt.env"
fi
command -v qemu-img >/dev/null 2>&1 || apt_install qemu-utils
cargo build --release -p virtrigaud-cli --features libvirt
# Not exec: the EXIT trap must still stop the peer when the bench ends.
python3 "${VRG_BENCH_PY:-scripts/bench-migration.py}" "$@"
