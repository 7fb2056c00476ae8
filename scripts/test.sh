#!/usr/bin/env bash
# The test suite, from a fresh machine: starts (or installs) MariaDB and Redis, then runs every test.
# Long chaos/soak runs are separate (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "test: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
# shellcheck source=scripts/services.sh
source scripts/services.sh
echo "test: MySQL at ${TELEMETRY_TEST_MYSQL_URL//:*@/:****@}, Redis at $TELEMETRY_TEST_REDIS_URL" >&2
cargo test --workspace --features telemetry-wal/failpoints "$@"
