#!/usr/bin/env bash
# A 3-node MariaDB Galera cluster on loopback, from temp directories, for the tests and the fleet bench.
#
#   scripts/galera.sh start            bootstrap node 1, join 2 and 3, wait until all 3 are Synced
#   scripts/galera.sh stop             stop every node and delete the cluster's directory
#   scripts/galera.sh kill N           kill -9 node N (a crash: no shutdown, no state saved)
#   scripts/galera.sh start-node N     start node N again: it recovers its position and rejoins by IST
#   scripts/galera.sh urls             print the nodes' URLs, space-separated
#   scripts/galera.sh status           each node's wsrep state
#
# Environment: GALERA_DIR (default /tmp/telemetry-galera), GALERA_PORT (default 13300: node N answers SQL on
# GALERA_PORT+N, replicates on +10+N, IST on +20+N, SST on +30+N). Everything listens on 127.0.0.1 only.
# Sized for a 2-core machine: 64 MiB buffer pool and gcache per node. Needs Debian's mariadb-server, galera-4
# and rsync (installed when missing).
set -euo pipefail

dir=${GALERA_DIR:-/tmp/telemetry-galera}
base=${GALERA_PORT:-13300}
nodes=(1 2 3)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
say() { echo "galera: $*" >&2; }

provider() {
    local p
    for p in /usr/lib/galera/libgalera_smm.so /usr/lib/libgalera_smm.so /usr/lib/x86_64-linux-gnu/galera/libgalera_smm.so; do
        [ -f "$p" ] && { echo "$p"; return 0; }
    done
    return 1
}

ensure_packages() {
    local missing=()
    [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server mariadb-client)
    provider >/dev/null || missing+=(galera-4)
    command -v rsync >/dev/null 2>&1 || missing+=(rsync)
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
}

port() { echo $((base + $1)); }
sql() { # node, statement
    mariadb --no-defaults --protocol=tcp -h127.0.0.1 -P"$(port "$1")" -uroot -N -B -e "$2"
}
status_of() { sql "$1" "SHOW STATUS LIKE '$2'" 2>/dev/null | cut -f2; }

# The account mariadbd runs as: itself when not root, `mysql` for root (mariadbd refuses to run as root).
run_user() { if [ "$(id -u)" = 0 ]; then echo mysql; else id -un; fi; }

node_args() { # node
    local n=$1 d="$dir/node$1" peers=""
    for m in "${nodes[@]}"; do peers+="${peers:+,}127.0.0.1:$((base + 10 + m))"; done
    echo --no-defaults --user="$(run_user)" --datadir="$d/data" --socket="$d/mysqld.sock" \
        --pid-file="$d/mysqld.pid" --log-error="$d/error.log" --port="$(port "$n")" --bind-address=127.0.0.1 \
        --skip-name-resolve --innodb-buffer-pool-size=64M --innodb-log-file-size=32M \
        --innodb-flush-log-at-trx-commit=2 --max-connections=400 \
        --binlog-format=ROW --innodb-autoinc-lock-mode=2 --default-storage-engine=InnoDB \
        --wsrep-on=ON --wsrep-provider="$(provider)" --wsrep-cluster-name=telemetry_test \
        --wsrep-cluster-address="gcomm://$peers" --wsrep-node-name="node$n" \
        --wsrep-node-address="127.0.0.1:$((base + 10 + n))" \
        --wsrep-provider-options="gmcast.listen_addr=tcp://127.0.0.1:$((base + 10 + n));ist.recv_addr=127.0.0.1:$((base + 20 + n));gcache.size=64M" \
        --wsrep-sst-method=rsync --wsrep-sst-receive-address="127.0.0.1:$((base + 30 + n))" \
        --wsrep-slave-threads=2
}

wait_for() { # seconds, what, command...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then say "$what: gave up after $1 s"; return 1; fi
        sleep 0.5
    done
}

synced() { [ "$(status_of "$1" wsrep_local_state_comment)" = Synced ] && [ "$(status_of "$1" wsrep_ready)" = ON ]; }
cluster_of_3() { [ "$(status_of 1 wsrep_cluster_size)" = 3 ]; }

launch() { # node, extra args...
    local n=$1; shift
    # shellcheck disable=SC2046
    /usr/sbin/mariadbd $(node_args "$n") "$@" >>"$dir/node$n/stdout.log" 2>&1 &
    disown
}

init_node() { # node
    local d="$dir/node$1"
    mkdir -p "$d/data"
    mariadb-install-db --no-defaults --user="$(run_user)" --datadir="$d/data" \
        --auth-root-authentication-method=normal --skip-test-db >"$d/install.log" 2>&1 \
        || { say "mariadb-install-db failed for node $1; see $d/install.log"; return 1; }
    # Root over TCP from 127.0.0.1 with no password, as on the single test server.
    [ "$(run_user)" = "$(id -un)" ] || chown -R "$(run_user)" "$d"
}

start_cluster() {
    ensure_packages
    if [ -d "$dir" ] && synced 1 && synced 2 && synced 3; then say "already running in $dir"; return 0; fi
    stop_cluster
    mkdir -p "$dir"
    [ "$(run_user)" = "$(id -un)" ] || chown "$(run_user)" "$dir"
    for n in "${nodes[@]}"; do init_node "$n"; done
    say "bootstrapping node 1 on port $(port 1)"
    launch 1 --wsrep-new-cluster
    wait_for 60 "node 1 Synced" synced 1
    # Root may connect over TCP from the loopback address as well (mariadb-install-db made root@localhost).
    sql 1 "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION" >/dev/null
    for n in 2 3; do
        say "joining node $n on port $(port "$n")"
        launch "$n"
        wait_for 120 "node $n Synced" synced "$n"
    done
    wait_for 30 "cluster size 3" cluster_of_3
    say "3 nodes Synced: $(urls)"
}

# A node killed with -9 left no saved position; --wsrep-recover reads it from InnoDB so the restart asks for
# an incremental state transfer (IST) instead of a full copy.
start_node() { # node
    local n=$1 d="$dir/node$1" position
    if sql "$n" "SELECT 1" >/dev/null 2>&1; then say "node $n already answers"; return 0; fi
    # shellcheck disable=SC2046
    /usr/sbin/mariadbd $(node_args "$n") --wsrep-recover --log-error="$d/recover.log" >/dev/null 2>&1 || true
    position=$(sed -n 's/.*WSREP: Recovered position: *\([^ ]*\).*/\1/p' "$d/recover.log" | tail -1)
    say "starting node $n${position:+ from $position}"
    if [ -n "$position" ]; then launch "$n" --wsrep-start-position="$position"; else launch "$n"; fi
    wait_for 120 "node $n Synced" synced "$n"
}

kill_node() { # node
    local pid_file="$dir/node$1/mysqld.pid"
    [ -f "$pid_file" ] || { say "node $1 has no pid file"; return 1; }
    kill -9 "$(cat "$pid_file")" 2>/dev/null || true
    rm -f "$pid_file"
    say "node $1 killed"
}

stop_cluster() {
    [ -d "$dir" ] || return 0
    local n pid
    for n in "${nodes[@]}"; do
        pid=$(cat "$dir/node$n/mysqld.pid" 2>/dev/null || true)
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for n in "${nodes[@]}"; do
        pid=$(cat "$dir/node$n/mysqld.pid" 2>/dev/null || true)
        [ -z "$pid" ] || wait_for 60 "node $n to stop" bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$dir"
}

urls() {
    local out=""
    for n in "${nodes[@]}"; do out+="${out:+ }mysql://root@127.0.0.1:$(port "$n")"; done
    echo "$out"
}

case "${1:-}" in
    start) start_cluster ;;
    stop) stop_cluster ;;
    kill) kill_node "${2:?node}" ;;
    start-node) start_node "${2:?node}" ;;
    urls) urls ;;
    status)
        for n in "${nodes[@]}"; do
            echo "node$n port $(port "$n"): $(status_of "$n" wsrep_local_state_comment || true) ready=$(status_of "$n" wsrep_ready || true) size=$(status_of "$n" wsrep_cluster_size || true)"
        done
        ;;
    *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
