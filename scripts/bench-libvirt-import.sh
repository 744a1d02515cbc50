#!/usr/bin/env bash
# libvirt import beside `virsh vol-upload --sparse` of the same disk (issue: a whole migration at
# the speed of its slowest component, item 2). Same setup as the whole-migration bench (release
# CLI, libvirt peer unless VIRTRIGAUD_LIBVIRT_URI is set). See benches/README.md.
#   scripts/bench-libvirt-import.sh [4/1]     (VIRTUAL_GIB/DATA_GIB; rounds: VRG_BENCH_ROUNDS)
VRG_BENCH_PY=scripts/bench-libvirt-import.py exec "$(dirname "$0")/bench-migration.sh" "$@"
