#!/usr/bin/env bash
# The test suite, from a fresh machine: starts (or installs) MariaDB and Redis, then runs every test.
# Long chaos/soak runs are separate (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "test: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
# shellcheck source=scripts/services.sh
source scripts/services.sh
# The packaging tests: systemd-analyze verifies the unit, cargo-deb builds the .deb (each test says SKIPPED
# when its tool cannot be had).
command -v systemd-analyze >/dev/null 2>&1 || install_packages systemd || echo "test: no systemd-analyze" >&2
cargo deb --version >/dev/null 2>&1 || cargo install cargo-deb --locked --quiet || echo "test: no cargo-deb" >&2
echo "test: MySQL at ${TELEMETRY_TEST_MYSQL_URL//:*@/:****@}, Redis at $TELEMETRY_TEST_REDIS_URL" >&2
cargo test --workspace --features telemetry-wal/failpoints "$@"
