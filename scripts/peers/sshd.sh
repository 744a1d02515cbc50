#!/usr/bin/env bash
# OpenSSH sshd (Debian) on 127.0.0.1 as the Proxmox node's SSH side: its own host key, client
# key, authorized_keys and pid file; a `pvesm` stand-in (sshd/pvesm) first on the session PATH,
# answering `pvesm path` and `pvesm export VOLID raw+size -` from image files under
# STATE_DIR/sshd/images (the tests put qemu-img images there) per storage type as upstream does
# (sshd/storage.cfg lists the storages), and a `blockdev --getsize64` stand-in (sshd/blockdev)
# for the image files that stand in for zvol devices.
#   sshd.sh install              openssh-server, openssh-client, python3 (apt)
#   sshd.sh start STATE_DIR      writes STATE_DIR/sshd.env and STATE_DIR/sshd.pid
#   sshd.sh stop STATE_DIR       stops sshd by PID
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
cmd=${1:?install|start|stop}
state=${2:-}
PORT=${VRG_SSHD_PORT:-18022}

case $cmd in
install)
    apt_install openssh-server openssh-client python3
    ;;
start)
    d="$state/sshd"
    mkdir -p "$d/bin" "$d/images/images"
    chmod 700 "$d"
    cp "$here/sshd/pvesm" "$here/sshd/blockdev" "$here/sshd/storage.cfg" "$d/bin/"
    chmod 755 "$d/bin/pvesm" "$d/bin/blockdev"
    rm -f "$d/host_ed25519" "$d/client_ed25519" "$d/wrong_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C virtrigaud-test-host -f "$d/host_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C virtrigaud-test-client -f "$d/client_ed25519"
    cp "$d/client_ed25519.pub" "$d/authorized_keys"
    chmod 600 "$d/authorized_keys"
    mkdir -p /run/sshd
    user=$(id -un)
    cat >"$d/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $PORT
HostKey $d/host_ed25519
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers $user
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
SetEnv PATH=$d/bin:/usr/local/bin:/usr/bin:/bin VRG_PVESM_IMAGES=$d/images
LogLevel VERBOSE
CONF
    /usr/sbin/sshd -t -f "$d/sshd_config"
    /usr/sbin/sshd -D -e -f "$d/sshd_config" -p "$PORT" >"$d/sshd.log" 2>&1 &
    echo $! >"$state/sshd.pid"
    wait_port "$PORT" 100 || { cat "$d/sshd.log"; exit 1; }
    fp=$(ssh-keygen -l -E sha256 -f "$d/host_ed25519.pub" | awk '{print $2}')
    printf '[127.0.0.1]:%s %s\n' "$PORT" "$(cut -d' ' -f1-2 "$d/host_ed25519.pub")" >"$d/known_hosts"
    cat >"$state/sshd.env" <<ENV
export VIRTRIGAUD_PVE_SSH_HOST=127.0.0.1
export VIRTRIGAUD_PVE_SSH_PORT=$PORT
export VIRTRIGAUD_PVE_SSH_USER=$user
export VIRTRIGAUD_PVE_SSH_KEY=$d/client_ed25519
export VIRTRIGAUD_PVE_SSH_HOST_FINGERPRINT=$fp
export VIRTRIGAUD_PVE_SSH_KNOWN_HOSTS=$d/known_hosts
export VIRTRIGAUD_PVE_SSH_IMAGES=$d/images
ENV
    ;;
stop)
    stop_pid "$state/sshd.pid"
    ;;
esac
