#!/usr/bin/env bash
# fakepve 0.5.0 (PyPI, AGPL-3.0: run, never copied) as the Proxmox VE API peer: a fake of the
# PVE 9 API that checks parameters against PVE's own schema. No real PVE can be installed here.
#   fakepve.sh install              python3-venv + openssl (apt), then a venv with fakepve==0.5.0
#                                   under ${VRG_FAKEPVE_VENV:-/opt/virtrigaud/fakepve-venv}
#   fakepve.sh start STATE_DIR      a CA and a server certificate (openssl), then two fakes on
#                                   127.0.0.1 (PVE 9.0.10, and an "old" 8.3.2 for the version
#                                   gate, whose tickets expire after 2 s) through
#                                   fakepve/serve.py; writes STATE_DIR/fakepve.env
#   fakepve.sh stop STATE_DIR       stops both by PID
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
cmd=${1:?install|start|stop}
state=${2:-}
VENV=${VRG_FAKEPVE_VENV:-/opt/virtrigaud/fakepve-venv}
PORT=${VRG_FAKEPVE_PORT:-18006}
OLD_PORT=${VRG_FAKEPVE_OLD_PORT:-18007}

case $cmd in
install)
    apt_install python3-venv openssl
    if ! "$VENV/bin/python" -c 'import fakepve, sys; sys.exit(fakepve.__version__ != "0.5.0")' 2>/dev/null; then
        mkdir -p "$(dirname "$VENV")"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check 'fakepve==0.5.0'
    fi
    ;;
start)
    d="$state/fakepve"
    mkdir -p "$d"
    # A CA of our own and a server certificate for 127.0.0.1 signed by it: tests verify the chain
    # with the CA, and (as with PVE's self-signed node certificates) pin the server's SHA-256.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj /CN=virtrigaud-test-ca -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
        -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$d/ext.cnf"
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
        -days 30 -extfile "$d/ext.cnf" -out "$d/server.pem" 2>/dev/null
    fp=$(openssl x509 -in "$d/server.pem" -noout -fingerprint -sha256 | cut -d= -f2)
    password=$(openssl rand -hex 12)
    token_secret=$(openssl rand -hex 16)
    # Guests the tests describe and drive (tests that create VMs take ids from /cluster/nextid).
    cat >"$d/guests.json" <<JSON
[
  {"vmid": 100, "name": "vrg-describe", "status": "stopped", "config": {
     "cores": 2, "sockets": 2, "memory": "3072", "bios": "ovmf", "machine": "q35", "ostype": "l26",
     "efidisk0": "local-lvm:vm-100-disk-9,efitype=4m,size=4M",
     "scsi0": "local-lvm:vm-100-disk-0,iothread=1,size=32G",
     "virtio1": "local:100/vm-100-disk-1.qcow2,size=10G",
     "ide2": "local:iso/debian.iso,media=cdrom,size=600M",
     "ide0": "local-lvm:vm-100-cloudinit,media=cdrom",
     "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=42,firewall=1",
     "net1": "e1000=BC:24:11:00:00:02,bridge=vmbr1",
     "description": "a test VM\nsecond line"}},
  {"vmid": 101, "name": "vrg-locked", "status": "stopped", "lock": "backup",
   "config": {"cores": 1, "memory": "512"}},
  {"vmid": 102, "name": "vrg-broken", "status": "stopped",
   "start_error": "kvm: -drive file=/dev/pve/vm-102-disk-0: Could not open '/dev/pve/vm-102-disk-0': No such file or directory",
   "config": {"cores": 1, "memory": "512"}},
  {"vmid": 103, "name": "vrg-power", "status": "stopped", "config": {"cores": 1, "memory": "512"}},
  {"vmid": 104, "name": "vrg-snap", "status": "stopped",
   "config": {"cores": 1, "memory": "512", "scsi0": "local-lvm:vm-104-disk-0,size=1G"}},
  {"vmid": 105, "name": "vrg-ha", "status": "stopped", "ha_state": "stopped",
   "config": {"cores": 1, "memory": "512"}},
  {"vmid": 106, "name": "vrg-noacpi", "status": "stopped", "acpi": false,
   "config": {"cores": 1, "memory": "512"}}
]
JSON
    for which in main old; do
        # The old instance's tickets expire after 2 s (PVE: 2 h), for the renewal test.
        if [ $which = main ]; then port=$PORT; version=9.0.10; ttl=7200; else port=$OLD_PORT; version=8.3.2; ttl=2; fi
        cat >"$d/$which.json" <<JSON
{"host": "127.0.0.1", "port": $port, "user": "root@pam", "password": "$password",
 "cert": "$d/server.pem", "key": "$d/server.key", "version": "$version", "ticket_ttl": $ttl,
 "tokens": {"root@pam!virtrigaud": "$token_secret", "audit@pve!ro": "$token_secret"},
 "acl": {"audit@pve": [["/", ["VM.Audit", "Sys.Audit", "Datastore.Audit"]]]},
 "storage_content": {"local": "iso,vztmpl,backup,import,images"},
 "guests": $(cat "$d/guests.json")}
JSON
        "$VENV/bin/python" "$here/fakepve/serve.py" "$d/$which.json" >"$d/$which.log" 2>&1 &
        echo $! >"$state/fakepve-$which.pid"
    done
    wait_port "$PORT" 150 || { cat "$d/main.log"; exit 1; }
    wait_port "$OLD_PORT" 150 || { cat "$d/old.log"; exit 1; }
    cat >"$state/fakepve.env" <<ENV
export VIRTRIGAUD_PVE_URL=https://127.0.0.1:$PORT
export VIRTRIGAUD_PVE_OLD_URL=https://127.0.0.1:$OLD_PORT
export VIRTRIGAUD_PVE_USER=root@pam
export VIRTRIGAUD_PVE_PASSWORD=$password
export VIRTRIGAUD_PVE_TOKEN_ID=root@pam!virtrigaud
export VIRTRIGAUD_PVE_TOKEN_SECRET=$token_secret
export VIRTRIGAUD_PVE_AUDIT_TOKEN_ID=audit@pve!ro
export VIRTRIGAUD_PVE_AUDIT_TOKEN_SECRET=$token_secret
export VIRTRIGAUD_PVE_FINGERPRINT=$fp
export VIRTRIGAUD_PVE_CA=$d/ca.pem
export VIRTRIGAUD_PVE_NODE=pve1
ENV
    ;;
stop)
    stop_pid "$state/fakepve-main.pid"
    stop_pid "$state/fakepve-old.pid"
    ;;
esac
