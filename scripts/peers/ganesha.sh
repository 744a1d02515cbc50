#!/usr/bin/env bash
# nfs-ganesha (VFS export, NFSv3) as the real peer of the native NFS backend, bound to 127.0.0.1.
#   ganesha.sh install              apt-installs rpcbind, nfs-ganesha, nfs-ganesha-vfs (no daemon left running)
#   ganesha.sh start STATE_DIR      starts rpcbind (if none runs) and ganesha.nfsd; writes
#                                   STATE_DIR/ganesha.env and STATE_DIR/ganesha.pid (+ rpcbind.pid
#                                   only when this script started rpcbind)
#   ganesha.sh stop STATE_DIR       stops ganesha, then rpcbind if we started it, by PID
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
cmd=${1:?install|start|stop}
state=${2:-}
EXPORT_PATH=/vrg
EXPORT_ID=${VRG_GANESHA_EXPORT_ID:-77}

case $cmd in
install)
    if ! command -v ganesha.nfsd >/dev/null 2>&1 || ! command -v rpcbind >/dev/null 2>&1 \
        || ! dpkg-query -W -f='${Status}' nfs-ganesha-vfs 2>/dev/null | grep -q "install ok installed"; then
        # No service manager here: make sure the packages' maintainer scripts start nothing.
        # An existing policy-rc.d is left alone; ours is removed again afterwards.
        ours=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            ours=1
        fi
        # Another apt/dpkg run (a parallel build, unattended upgrades) may hold the dpkg lock:
        # retry for up to 10 minutes instead of failing at once.
        rc=1
        for _ in $(seq 1 120); do
            rc=0
            apt_install rpcbind nfs-ganesha nfs-ganesha-vfs 2>"/tmp/.vrg-ganesha-apt.$$" || rc=$?
            if [ "$rc" != 0 ] && grep -q "Could not get lock\|Unable to acquire the dpkg" "/tmp/.vrg-ganesha-apt.$$"; then
                sleep 5
                continue
            fi
            cat "/tmp/.vrg-ganesha-apt.$$" >&2
            break
        done
        rm -f "/tmp/.vrg-ganesha-apt.$$"
        [ -n "$ours" ] && rm -f /usr/sbin/policy-rc.d
        [ "$rc" = 0 ] || { echo "installing nfs-ganesha failed" >&2; exit "$rc"; }
    fi
    command -v ganesha.nfsd >/dev/null && command -v rpcbind >/dev/null
    ;;
start)
    [ -n "$state" ] || { echo "usage: $0 start STATE_DIR" >&2; exit 2; }
    mkdir -p "$state"
    state=$(cd "$state" && pwd)
    dir="$state/ganesha"
    # NFS has a fixed port: a server already on it would answer in our place.
    if (exec 3<>/dev/tcp/127.0.0.1/2049) 2>/dev/null; then
        echo "127.0.0.1:2049 is already in use (another NFS server?): stop it first" >&2
        exit 1
    fi
    mkdir -p "$dir/export" "$dir/recov"
    chmod 0777 "$dir/export"
    # rpcbind: ganesha registers its services with it. Reuse one that answers already (a
    # process-name check would also match a defunct one).
    if ! (exec 3<>/dev/tcp/127.0.0.1/111) 2>/dev/null; then
        mkdir -p /run/rpcbind
        rpcbind -f -w >"$dir/rpcbind.log" 2>&1 &
        echo $! >"$state/rpcbind.pid"
        wait_port 111 50 || { echo "rpcbind did not start" >&2; cat "$dir/rpcbind.log" >&2; exit 1; }
    fi
    cat >"$dir/ganesha.conf" <<CONF
NFS_CORE_PARAM {
    Bind_addr = 127.0.0.1;
    Protocols = 3, 4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    # NFSv3 clients mount the Pseudo path (nfs://127.0.0.1/vrg), as NFSv4 clients do.
    Mount_Path_Pseudo = true;
}
NFSV4 {
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = "$dir/recov";
}
NFS_KRB5 { Active_krb5 = false; }
EXPORT {
    Export_Id = $EXPORT_ID;
    Path = "$dir/export";
    Pseudo = "$EXPORT_PATH";
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 3, 4;
    Transports = TCP;
    FSAL { Name = VFS; }
}
LOG { Default_Log_Level = WARN; }
CONF
    ganesha.nfsd -F -L "$dir/ganesha.log" -f "$dir/ganesha.conf" -p "$dir/ganesha.nfsd.pid" \
        >"$dir/stdout.log" 2>&1 &
    echo $! >"$state/ganesha.pid"
    if ! wait_port 2049 150 || ! kill -0 "$(cat "$state/ganesha.pid")" 2>/dev/null; then
        echo "ganesha did not start" >&2
        tail -n 30 "$dir/ganesha.log" "$dir/stdout.log" >&2 || true
        stop_pid "$state/ganesha.pid"
        stop_pid "$state/rpcbind.pid"
        exit 1
    fi
    cat >"$state/ganesha.env" <<ENV
export VIRTRIGAUD_NFS_URL=nfs://127.0.0.1$EXPORT_PATH
export VIRTRIGAUD_NFS_EXPORT_DIR=$dir/export
export VIRTRIGAUD_NFS_STATE_DIR=$state
ENV
    ;;
stop)
    [ -n "$state" ] || { echo "usage: $0 stop STATE_DIR" >&2; exit 2; }
    stop_pid "$state/ganesha.pid"
    stop_pid "$state/rpcbind.pid"
    ;;
*)
    echo "usage: $0 install|start STATE_DIR|stop STATE_DIR" >&2
    exit 2
    ;;
esac
