#!/usr/bin/env bash
# Makes sure MariaDB and Redis answer on 127.0.0.1, installing them from Debian's packages and starting them
# when needed. Source it: it exports TELEMETRY_TEST_MYSQL_URL and TELEMETRY_TEST_REDIS_URL for the tests.
# Respects URLs already set in the environment (then it only checks nothing).

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_packages() {
    echo "services: installing $*" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

wait_for() { # seconds, command...
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then return 1; fi
        sleep 0.5
    done
}

ensure_mariadb() {
    if [ -n "${TELEMETRY_TEST_MYSQL_URL:-}" ]; then return 0; fi
    command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || install_packages mariadb-server mariadb-client
    if ! mysqladmin --protocol=tcp -h127.0.0.1 -P3306 ping >/dev/null 2>&1 \
        && ! mysqladmin ping >/dev/null 2>&1; then
        echo "services: starting MariaDB" >&2
        as_root install -d -o mysql -g mysql /run/mysqld
        as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
        wait_for 60 mysqladmin ping || { echo "services: MariaDB did not start" >&2; return 1; }
    fi
    if mysql --protocol=tcp -h127.0.0.1 -P3306 -uroot -e 'SELECT 1' >/dev/null 2>&1; then
        export TELEMETRY_TEST_MYSQL_URL="mysql://root@127.0.0.1:3306"
    else
        # Debian's default: root only through the socket. Tests get their own user over TCP.
        echo "services: root over TCP refused; creating user telemetry_test through the socket" >&2
        as_root mysql -uroot -e "CREATE USER IF NOT EXISTS 'telemetry_test'@'127.0.0.1' IDENTIFIED BY 'telemetry_test';
            GRANT ALL PRIVILEGES ON *.* TO 'telemetry_test'@'127.0.0.1' WITH GRANT OPTION;" || return 1
        export TELEMETRY_TEST_MYSQL_URL="mysql://telemetry_test:telemetry_test@127.0.0.1:3306"
    fi
}

ensure_redis() {
    if [ -n "${TELEMETRY_TEST_REDIS_URL:-}" ]; then return 0; fi
    command -v redis-server >/dev/null 2>&1 || install_packages redis-server redis-tools
    if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
        echo "services: starting Redis" >&2
        as_root install -d /var/lib/redis /var/log/redis
        as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
            --dir /var/lib/redis --logfile /var/log/redis/ci.log
        wait_for 30 redis-cli -h 127.0.0.1 -p 6379 ping || { echo "services: Redis did not start" >&2; return 1; }
    fi
    export TELEMETRY_TEST_REDIS_URL="redis://127.0.0.1:6379"
}

ensure_mariadb && ensure_redis
