#!/usr/bin/env bash
# Runs benches/s3_export.rs against a SeaweedFS started here: installs awscli (PyPI) and
# SeaweedFS, starts it, runs the benchmark, stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
command -v aws >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check awscli
command -v qemu-img >/dev/null 2>&1 || apt_install qemu-utils
scripts/peers/seaweedfs.sh install
STATE=$(mktemp -d /tmp/virtrigaud-bench.XXXXXX)
trap 'scripts/peers/seaweedfs.sh stop "$STATE"; rm -rf "$STATE"' EXIT
scripts/peers/seaweedfs.sh start "$STATE"
source "$STATE/seaweedfs.env"
sleep 2
cargo bench --features s3,encryption --bench s3_export
