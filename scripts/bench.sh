#!/usr/bin/env bash
# Every benchmark in one go, then docs/benchmarks.md (ratios against the old ways and the ceilings, all
# measured in this run) and docs/mysql-outage.png (throughput, backlog and lag through a MySQL outage).
#
#   scripts/bench.sh                  # full run: every bench with its default sizes and durations
#   BENCH_QUICK=1 scripts/bench.sh    # smoke test: everything shortened (about 3-5 minutes)
#   scripts/bench.sh soak             # the soak run alone, then docs/soak.md and docs/soak.png (SOAK_SECS,
#                                     # default 1800; see agent/benches/soak.rs)
#   scripts/bench.sh fleet            # 1, 4 and 16 agents into MariaDB and into a 3-node Galera cluster that
#                                     # it starts (scripts/galera.sh) and stops: docs/fleet.md's tables
#
# Makes sure MariaDB and Redis answer (scripts/services.sh, as the tests do) and installs redis-py for the
# Python baseline when it is missing, sets up the Python client's venv (scripts/pyvenv.sh, as the tests do),
# builds every bench in release once, then runs them one after the other (last the Python client's benchmark,
# clients/python/benchmarks/compare.py) with BENCH_REPORT_DIR (default target/bench-report) set: each bench
# prints its tables as when run alone and also writes its key numbers there as JSON lines (plus its output as
# *.log). Last, the report bench turns them into BENCH_DOCS_DIR (default docs/). Each bench's own settings
# (BENCH_SECS, BENCH_ROWS, ...) pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "bench: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
# shellcheck source=scripts/services.sh
source scripts/services.sh

if [ "${1:-}" = soak ]; then
    exec cargo bench -p telemetry-agent --bench soak
fi
if [ "${1:-}" = fleet ]; then
    if [ -z "${TELEMETRY_TEST_GALERA_URLS:-}" ]; then
        bash scripts/galera.sh start
        trap 'bash scripts/galera.sh stop' EXIT
        TELEMETRY_TEST_GALERA_URLS="$(bash scripts/galera.sh urls)"
        export TELEMETRY_TEST_GALERA_URLS
    fi
    cargo bench -p telemetry-agent --bench fleet
    exit 0
fi
[ $# -eq 0 ] || { echo "usage: scripts/bench.sh [soak|fleet]" >&2; exit 2; }

if ! python3 -c 'import redis' >/dev/null 2>&1; then
    echo "bench: installing redis-py for the Python baseline of the Redis bench" >&2
    python3 -m pip install --quiet redis >&2 || echo "bench: no redis-py; the Python row will be missing" >&2
fi
# The Python client's benchmark runs in the venv of its tests (mysql-connector-python, redis-py).
# shellcheck source=scripts/pyvenv.sh
source scripts/pyvenv.sh
ensure_pyvenv bench

export BENCH_REPORT_DIR
BENCH_REPORT_DIR="$(realpath -m "${BENCH_REPORT_DIR:-${CARGO_TARGET_DIR:-target}/bench-report}")"
mkdir -p "$BENCH_REPORT_DIR"
rm -f "$BENCH_REPORT_DIR"/{run,append,ingest,steady,mysql,redis,python}.jsonl "$BENCH_REPORT_DIR"/mysql-outage.csv \
    "$BENCH_REPORT_DIR"/{build,append,ingest,steady,mysql,redis,python,report}.log
quick=false
if [ -n "${BENCH_QUICK:-}" ] && [ "${BENCH_QUICK}" != 0 ]; then quick=true; fi
echo "{\"kind\":\"run\",\"quick\":$quick,\"started\":\"$(date -u '+%Y-%m-%d %H:%M UTC')\"}" >"$BENCH_REPORT_DIR/run.jsonl"
echo "bench: MySQL at ${TELEMETRY_TEST_MYSQL_URL//:*@/:****@}, Redis at $TELEMETRY_TEST_REDIS_URL; results in $BENCH_REPORT_DIR (quick: $quick)" >&2

# step NAME LABEL COMMAND...: runs COMMAND, keeps its output in NAME.log and its duration in run.jsonl.
step() {
    local name=$1 label=$2 started=$SECONDS
    shift 2
    echo >&2
    echo "=== bench: $label ($(date -u '+%H:%M:%S'))" >&2
    "$@" 2>&1 | tee "$BENCH_REPORT_DIR/$name.log"
    local secs=$((SECONDS - started))
    echo "{\"kind\":\"step\",\"name\":\"$label\",\"secs\":$secs}" >>"$BENCH_REPORT_DIR/run.jsonl"
    echo "=== bench: $label took ${secs} s" >&2
}

step build "release build" cargo bench --no-run -p telemetry-wal -p telemetry-agent
step append "WAL append" cargo bench -q -p telemetry-wal --bench append
step ingest "socket ingest" cargo bench -q -p telemetry-agent --bench ingest
step steady "steady state" cargo bench -q -p telemetry-agent --bench steady
step mysql "MySQL" cargo bench -q -p telemetry-agent --bench mysql
step redis "Redis" cargo bench -q -p telemetry-agent --bench redis
step python "Python client" "$python_venv/bin/python" clients/python/benchmarks/compare.py
cargo bench -q -p telemetry-agent --bench report >"$BENCH_REPORT_DIR/report.log"
echo >&2
sed -n '/^## Summary/,/^## Details/p' "$BENCH_REPORT_DIR/report.log" | sed '$d'
echo "bench: wrote ${BENCH_DOCS_DIR:-docs}/benchmarks.md and ${BENCH_DOCS_DIR:-docs}/mysql-outage.png (raw results in $BENCH_REPORT_DIR)" >&2
