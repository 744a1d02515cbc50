#!/usr/bin/env bash
# Runs benches/vsphere_export.rs against the govmomi simulator started here: installs and starts
# it (scripts/peers/vcsim.sh), runs the benchmark, stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
command -v qemu-img >/dev/null 2>&1 || apt_install qemu-utils
command -v curl >/dev/null 2>&1 || apt_install curl
scripts/peers/vcsim.sh install
STATE=$(mktemp -d /tmp/virtrigaud-bench.XXXXXX)
trap 'scripts/peers/vcsim.sh stop "$STATE"; rm -rf "$STATE"' EXIT
scripts/peers/vcsim.sh start "$STATE"
source "$STATE/vcsim.env"
cargo bench --features vsphere --bench vsphere_export
