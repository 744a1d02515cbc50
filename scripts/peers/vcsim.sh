#!/usr/bin/env bash
# The govmomi simulator (vcsim) as the vSphere peer: our own small main.go (scripts/peers/vcsim/)
# built against Debian's govmomi 0.24, vCenter model (DC0, cluster DC0_C0, hosts, LocalDS_0,
# network "VM Network", VMs DC0_H0_VM0 …), TLS with a fresh self-signed certificate whose SHA-256
# thumbprint the tests pin, bound to 127.0.0.1.
#   vcsim.sh install              apt-installs golang-go, golang-github-vmware-govmomi-dev, openssl,
#                                 python3-venv; a venv with pyvmomi (VMware's own Python client,
#                                 the independent check of the VMs we create: pyvmomi_devices.py)
#                                 under ${VRG_PYVMOMI_VENV:-/opt/virtrigaud/pyvmomi-venv}
#   vcsim.sh start STATE_DIR      makes the certificate, builds the binary (Go cache in
#                                 ~/.cache/virtrigaud-go), starts it, writes STATE_DIR/vcsim.env
#   vcsim.sh stop STATE_DIR       stops it by PID
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
cmd=${1:?install|start|stop}
state=${2:-}
PORT=${VRG_VCSIM_PORT:-18989}
src=$(cd "$(dirname "$0")/vcsim" && pwd)
PYVMOMI_VENV=${VRG_PYVMOMI_VENV:-/opt/virtrigaud/pyvmomi-venv}
PYVMOMI_VERSION=9.1.1.0

case $cmd in
install)
    apt_install golang-go golang-github-vmware-govmomi-dev openssl python3-venv
    if ! "$PYVMOMI_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('pyvmomi') != '$PYVMOMI_VERSION')" 2>/dev/null; then
        mkdir -p "$(dirname "$PYVMOMI_VENV")"
        python3 -m venv "$PYVMOMI_VENV"
        "$PYVMOMI_VENV/bin/pip" install -q --disable-pip-version-check "pyvmomi==$PYVMOMI_VERSION"
    fi
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
    if [ -x "$PYVMOMI_VENV/bin/python" ]; then
        echo "export VIRTRIGAUD_PYVMOMI=\"$PYVMOMI_VENV/bin/python $src/pyvmomi_devices.py\"" >>"$state/vcsim.env"
    fi
    ;;
stop)
    stop_pid "$state/vcsim.pid"
    ;;
esac
