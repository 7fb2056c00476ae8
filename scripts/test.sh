#!/usr/bin/env bash
# The test suite, from a fresh machine: starts (or installs) MariaDB and Redis, then runs every test.
# Long chaos/soak runs are separate (see docs/testing.md, "Long runs").
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "test: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
# shellcheck source=scripts/services.sh
source scripts/services.sh
# The packaging tests: systemd-analyze verifies the unit, cargo-deb builds the .deb. On a developer machine
# a tool that cannot be had makes its test say SKIPPED; under CI=true it is an error (so are the tests' skips).
need() { # tool, install command...
    local tool=$1; shift
    "$@" && return 0
    if [ "${CI:-}" = true ]; then echo "test: cannot install $tool, which CI needs" >&2; exit 1; fi
    echo "test: no $tool; its test says SKIPPED" >&2
}
command -v systemd-analyze >/dev/null 2>&1 || need systemd-analyze install_packages systemd
cargo deb --version >/dev/null 2>&1 || need cargo-deb cargo install cargo-deb --locked --quiet
# The alert rules' unit tests (promtool) and the dashboard's test against a live Prometheus.
command -v promtool >/dev/null 2>&1 || need prometheus install_packages prometheus
# The Python client's tests and lint tools live in a venv under target/ (PyPI: requirements-dev.txt).
# shellcheck source=scripts/pyvenv.sh
source scripts/pyvenv.sh
ensure_pyvenv test
# The Galera tests' cluster: 3 nodes on loopback ports from a temp directory (scripts/galera.sh), stopped
# when the tests end. One that is already set (TELEMETRY_TEST_GALERA_URLS) is used as it is.
if [ -z "${TELEMETRY_TEST_GALERA_URLS:-}" ]; then
    if bash scripts/galera.sh start; then
        trap 'bash scripts/galera.sh stop' EXIT
        TELEMETRY_TEST_GALERA_URLS="$(bash scripts/galera.sh urls)"
        export TELEMETRY_TEST_GALERA_URLS
    elif [ "${CI:-}" = true ]; then
        echo "test: the Galera cluster did not start, and CI needs it" >&2; exit 1
    else
        echo "test: no Galera cluster; its tests say SKIPPED" >&2
    fi
fi
echo "test: MySQL at ${TELEMETRY_TEST_MYSQL_URL//:*@/:****@}, Redis at $TELEMETRY_TEST_REDIS_URL" >&2
cargo test --workspace --features telemetry-wal/failpoints "$@"
# The client's tests run the release agent, as scripts meet it.
cargo build --release -p telemetry-agent
TELEMETRY_AGENT_BIN="$PWD/target/release/telemetry-agent" "$python_venv/bin/pytest" -q clients/python/tests
