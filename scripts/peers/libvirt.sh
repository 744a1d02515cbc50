#!/usr/bin/env bash
# libvirtd (Debian, 9.0) with the QEMU driver as the libvirt peer, TCP listener on 127.0.0.1
# without authentication.
#   libvirt.sh install              apt-installs libvirt-daemon, libvirt-clients, libvirt-dev and
#                                   qemu-system-x86 (no recommends, never libvirt-daemon-system,
#                                   which pulls systemd); creates user/group libvirt-qemu; QEMU
#                                   runs as root. libvirt-dev is also what the Rust crate `virt`
#                                   links against, so this must run before cargo.
#   libvirt.sh start STATE_DIR      starts virtlogd and libvirtd --listen; writes
#                                   STATE_DIR/libvirt.env and the PID files
#   libvirt.sh stop STATE_DIR       stops both by PID
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
cmd=${1:?install|start|stop}
state=${2:-}
PORT=${VRG_LIBVIRT_TCP_PORT:-16509}

case $cmd in
install)
    apt_install libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev \
        qemu-system-x86 pkg-config
    getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
    getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -d /var/lib/libvirt \
        -s /usr/sbin/nologin libvirt-qemu
    mkdir -p /etc/libvirt
    touch /etc/libvirt/qemu.conf
    grep -q '^user = "root"' /etc/libvirt/qemu.conf || echo 'user = "root"' >>/etc/libvirt/qemu.conf
    grep -q '^group = "root"' /etc/libvirt/qemu.conf || echo 'group = "root"' >>/etc/libvirt/qemu.conf
    ;;
start)
    mkdir -p "$state/libvirt"
    cat >"$state/libvirt/libvirtd.conf" <<CONF
listen_tls = 0
listen_tcp = 1
listen_addr = "127.0.0.1"
tcp_port = "$PORT"
auth_tcp = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
CONF
    mkdir -p /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
    if ! pgrep -x virtlogd >/dev/null 2>&1; then
        /usr/sbin/virtlogd >"$state/libvirt/virtlogd.log" 2>&1 &
        echo $! >"$state/virtlogd.pid"
    fi
    # A plain system PATH: libvirtd looks up qemu-img in its PATH once at start; started with
    # this machine's login PATH it found none and offline snapshots failed ("unable to find
    # qemu-img").
    env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        /usr/sbin/libvirtd --listen -f "$state/libvirt/libvirtd.conf" >"$state/libvirt/libvirtd.log" 2>&1 &
    echo $! >"$state/libvirt.pid"
    ok=
    for _ in $(seq 1 150); do
        if virsh -c qemu:///system version >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.2
    done
    [ -n "$ok" ] || { echo "libvirtd did not start"; tail -20 "$state/libvirt/libvirtd.log"; exit 1; }
    wait_port "$PORT" 100
    cat >"$state/libvirt.env" <<ENV
export VIRTRIGAUD_LIBVIRT_URI=qemu:///system
export VIRTRIGAUD_LIBVIRT_TCP_URI=qemu+tcp://127.0.0.1:$PORT/system
ENV
    ;;
stop)
    stop_pid "$state/libvirt.pid"
    stop_pid "$state/virtlogd.pid"
    ;;
esac
