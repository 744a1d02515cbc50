# Shared helpers for scripts/test.sh and scripts/peers/*.sh (source it).

# apt_install PKG... : installs Debian packages non-interactively, running `apt-get update`
# at most once per boot of the machine (marker in /tmp).
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    export DEBIAN_FRONTEND=noninteractive
    if [ ! -f /tmp/.virtrigaud-apt-updated ]; then
        apt-get update -qq && touch /tmp/.virtrigaud-apt-updated
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# wait_port PORT [TRIES]: waits until 127.0.0.1:PORT accepts TCP connections.
wait_port() {
    local port=$1 tries=${2:-100}
    for _ in $(seq 1 "$tries"); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.2
    done
    echo "nothing listens on 127.0.0.1:$port" >&2
    return 1
}

# stop_pid FILE: stops the process whose PID is in FILE (TERM, then KILL after 20 s).
stop_pid() {
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}
