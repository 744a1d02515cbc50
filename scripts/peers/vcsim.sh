#!/usr/bin/env bash
# The govmomi simulator (vcsim) as the vSphere peer: our own small main.go (scripts/peers/vcsim/)
# built against Debian's govmomi 0.24, vCenter model (DC0, cluster DC0_C0, hosts, LocalDS_0,
# network "VM Network", VMs DC0_H0_VM0 …), TLS with a fresh self-signed certificate whose SHA-256
# thumbprint the tests pin, bound to 127.0.0.1.
#   vcsim.sh install              apt-installs golang-go, golang-github-vmware-govmomi-dev, openssl
#   vcsim.sh start STATE_DIR      makes the certificate, builds the binary (Go cache in
#                                 ~/.cache/virtrigaud-go), starts it, writes STATE_DIR/vcsim.env
#   vcsim.sh stop STATE_DIR       stops it by PID
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
cmd=${1:?install|start|stop}
state=${2:-}
PORT=${VRG_VCSIM_PORT:-18989}
src=$(cd "$(dirname "$0")/vcsim" && pwd)

case $cmd in
install)
    apt_install golang-go golang-github-vmware-govmomi-dev openssl
    ;;
start)
    d="$state/vcsim"
    mkdir -p "$d/nfc"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
        -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
        -keyout "$d/key.pem" -out "$d/cert.pem" 2>/dev/null
    thumb=$(openssl x509 -in "$d/cert.pem" -noout -fingerprint -sha256 | cut -d= -f2)
    (cd "$src" && GO111MODULE=off GOPATH=/usr/share/gocode \
        GOCACHE="${XDG_CACHE_HOME:-$HOME/.cache}/virtrigaud-go" go build -o "$d/vcsim" .)
    password="vrg-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
    "$d/vcsim" -listen "127.0.0.1:$PORT" -cert "$d/cert.pem" -key "$d/key.pem" \
        -user vrg -pass "$password" -nfc-dir "$d/nfc" >"$d/vcsim.log" 2>&1 &
    echo $! >"$state/vcsim.pid"
    wait_port "$PORT" 150
    cat >"$state/vcsim.env" <<ENV
export VIRTRIGAUD_VSPHERE_URL=https://127.0.0.1:$PORT/sdk
export VIRTRIGAUD_VSPHERE_USER=vrg
export VIRTRIGAUD_VSPHERE_PASSWORD=$password
export VIRTRIGAUD_VSPHERE_THUMBPRINT=$thumb
export VIRTRIGAUD_VSPHERE_NFC_DIR=$d/nfc
export VIRTRIGAUD_VCSIM_BIN=$d/vcsim
export VIRTRIGAUD_VCSIM_CERT=$d/cert.pem
export VIRTRIGAUD_VCSIM_KEY=$d/key.pem
ENV
    ;;
stop)
    stop_pid "$state/vcsim.pid"
    ;;
esac
