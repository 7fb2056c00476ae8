#!/usr/bin/env bash
# Fuzzing for a fixed time (long mode, not in the default suite): every cargo-fuzz target in fuzz/ runs
# FUZZ_SECS seconds (default 600) each, one after the other.
#
#   scripts/fuzz.sh                     # both targets, 10 min each
#   FUZZ_SECS=60 scripts/fuzz.sh wal_record
#
# Each target starts from its checked-in seed corpus (fuzz/corpus/TARGET, kept small) and writes the inputs
# it finds to a scratch corpus (target/fuzz-corpus/TARGET), which later runs start from too. A single
# allocation above 64 MiB or a process above 1 GiB counts as a failure (nothing either decoder is given
# justifies that), as does a panic; libFuzzer leaves the input in fuzz/artifacts/TARGET/ and the script
# exits non-zero. The toolchain here is stable; RUSTC_BOOTSTRAP=1 lets cargo-fuzz use its nightly flags.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
command -v cargo >/dev/null || { echo "fuzz: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet
fi
secs="${FUZZ_SECS:-600}"
targets=("$@")
cd "$root/fuzz"
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
export RUSTC_BOOTSTRAP=1
for target in "${targets[@]}"; do
    scratch="$root/target/fuzz-corpus/$target"
    mkdir -p "$scratch"
    echo "=== fuzz: $target for ${secs} s (seeds: fuzz/corpus/$target, found inputs: ${scratch#"$root"/})" >&2
    # -print_final_stats: executions, new inputs and peak RSS at the end.
    cargo fuzz run "$target" "$scratch" "corpus/$target" -- \
        -max_total_time="$secs" -rss_limit_mb=1024 -malloc_limit_mb=64 -print_final_stats=1
done
echo "fuzz: no crash, panic or oversized allocation in ${targets[*]} (${secs} s each)" >&2
