#!/usr/bin/env bash
# nginx as the WebDAV (PUT/DELETE/MKCOL/COPY/MOVE + PROPFIND via dav-ext) and plain HTTP peer,
# bound to 127.0.0.1. No service manager: nginx runs in the foreground (`daemon off`) in the
# background of this script, with its own config, pid file, logs and temp paths in STATE_DIR.
#   nginx.sh install              apt-installs nginx and the dav-ext module (PROPFIND)
#   nginx.sh start STATE_DIR      starts it; writes STATE_DIR/nginx.env and nginx.pid
#   nginx.sh stop STATE_DIR       stops it by PID
#
# Locations:  /dav/  WebDAV with HTTP basic auth (user below), data in STATE_DIR/nginx/data/dav
#             /pub/  read-only plain HTTP, no auth, data in STATE_DIR/nginx/data/pub
#             /busy/ always 503 (retry tests count its requests in the access log)
#             https://127.0.0.1:TLS_PORT/pub/  the same files over TLS with a self-signed cert
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
cmd=${1:?install|start|stop}
state=${2:-}
PORT=${VRG_NGINX_PORT:-18080}
TLS_PORT=${VRG_NGINX_TLS_PORT:-18443}
USER_NAME=vrgdav
PASSWORD=vrgdav-test-password-not-a-real-one
DAV_EXT=/usr/lib/nginx/modules/ngx_http_dav_ext_module.so

case $cmd in
install)
    # Debian's postinst would start the packaged nginx (port 80) through invoke-rc.d: forbid
    # it for the duration of the install unless a policy already does (container images).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt_install nginx libnginx-mod-http-dav-ext openssl
    ;;
start)
    [ -n "$state" ] || { echo "usage: nginx.sh start STATE_DIR" >&2; exit 2; }
    base=$(cd "$state" && pwd)/nginx
    mkdir -p "$base/data/dav" "$base/data/pub" "$base/tmp/body" "$base/tmp/proxy" \
        "$base/tmp/fastcgi" "$base/tmp/uwsgi" "$base/tmp/scgi" "$base/logs"
    # nginx workers run as `nobody`: they must be able to traverse to and write the data dirs.
    chmod 755 "$state" "$base" "$base/data" "$base/tmp"
    chown -R nobody "$base/data" "$base/tmp"
    chmod -R u+rwX "$base/data"
    # A self-signed certificate for the TLS server (clients must refuse it by default).
    [ -f "$base/tls.key" ] || openssl req -x509 -newkey rsa:2048 -nodes -days 30 \
        -subj "/CN=127.0.0.1" -keyout "$base/tls.key" -out "$base/tls.crt" >/dev/null 2>&1
    chmod 644 "$base/tls.crt"
    hash=$(openssl passwd -apr1 "$PASSWORD")
    printf '%s:%s\n' "$USER_NAME" "$hash" >"$base/htpasswd"
    chmod 644 "$base/htpasswd"
    load=""
    [ -f "$DAV_EXT" ] && load="load_module $DAV_EXT;"
    cat >"$base/nginx.conf" <<CONF
$load
daemon off;
master_process on;
worker_processes 2;
pid $base/nginx.pid;
error_log $base/logs/error.log warn;
events { worker_connections 256; }
http {
    access_log $base/logs/access.log;
    client_body_temp_path $base/tmp/body;
    proxy_temp_path $base/tmp/proxy;
    fastcgi_temp_path $base/tmp/fastcgi;
    uwsgi_temp_path $base/tmp/uwsgi;
    scgi_temp_path $base/tmp/scgi;
    sendfile on;
    server {
        listen 127.0.0.1:$PORT;
        server_name localhost;
        location /dav/ {
            alias $base/data/dav/;
            auth_basic "virtrigaud test";
            auth_basic_user_file $base/htpasswd;
            dav_methods PUT DELETE MKCOL COPY MOVE;
            $( [ -n "$load" ] && echo "dav_ext_methods PROPFIND OPTIONS;" )
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            client_max_body_size 0;
            client_body_buffer_size 1m;
        }
        location /pub/ {
            alias $base/data/pub/;
            limit_except GET HEAD { deny all; }
        }
        location /busy/ {
            return 503;
        }
    }
    server {
        listen 127.0.0.1:$TLS_PORT ssl;
        server_name localhost;
        ssl_certificate $base/tls.crt;
        ssl_certificate_key $base/tls.key;
        location /pub/ {
            alias $base/data/pub/;
            limit_except GET HEAD { deny all; }
        }
    }
}
CONF
    nginx -t -c "$base/nginx.conf" -e "$base/logs/error.log" >"$base/logs/configtest" 2>&1 \
        || { cat "$base/logs/configtest"; exit 1; }
    nginx -c "$base/nginx.conf" -e "$base/logs/error.log" >"$base/logs/stdout" 2>&1 &
    echo $! >"$state/nginx.pid"
    wait_port "$PORT" 100 || { echo "nginx did not start"; tail -20 "$base/logs/error.log"; exit 1; }
    cat >"$state/nginx.env" <<ENV
export VIRTRIGAUD_WEBDAV_URL=http://127.0.0.1:$PORT/dav/
export VIRTRIGAUD_WEBDAV_USER=$USER_NAME
export VIRTRIGAUD_WEBDAV_PASSWORD=$PASSWORD
export VIRTRIGAUD_WEBDAV_DATA_DIR=$base/data/dav
export VIRTRIGAUD_HTTP_URL=http://127.0.0.1:$PORT/pub/
export VIRTRIGAUD_HTTP_DATA_DIR=$base/data/pub
export VIRTRIGAUD_HTTP_BUSY_URL=http://127.0.0.1:$PORT/busy/
export VIRTRIGAUD_HTTPS_URL=https://127.0.0.1:$TLS_PORT/pub/
export VIRTRIGAUD_NGINX_ACCESS_LOG=$base/logs/access.log
ENV
    ;;
stop)
    [ -n "$state" ] || { echo "usage: nginx.sh stop STATE_DIR" >&2; exit 2; }
    stop_pid "$state/nginx.pid"
    ;;
*)
    echo "usage: nginx.sh install|start STATE_DIR|stop STATE_DIR" >&2
    exit 2
    ;;
esac
