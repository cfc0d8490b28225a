#!/bin/sh
# Runs fuzz targets for SECONDS seconds each (default 600), one after the other, with
# libFuzzer through cargo-fuzz. Stable toolchains work with RUSTC_BOOTSTRAP=1.
#
#   fuzz/run.sh [SECONDS] [TARGET...]      e.g. fuzz/run.sh 600, fuzz/run.sh 60 protocol
#
# Needs `cargo install cargo-fuzz`. Each target starts from the checked-in valid inputs
# in fuzz/seeds/<target>/ (and the tokens of fuzz/dicts/<target>.dict, if any) (rewrite them with `cargo test --release -p migration-testkit
# --test fuzz_bodies -- --ignored write_fuzz_seeds`) plus its growing corpus in
# fuzz/corpus/<target>/. Logs go to fuzz/logs/<target>.log; the final executions line
# of each is printed. Crashes land in fuzz/artifacts/<target>/: turn each into a
# regression test in migration-testkit/tests/fuzz_bodies.rs.
set -eu
cd "$(dirname "$0")"
secs=${1:-600}
[ $# -gt 0 ] && shift
targets=${*:-container protocol kvm_state memory_ranges}
export RUSTC_BOOTSTRAP=1
mkdir -p logs
for t in $targets; do
    echo "== $t: ${secs}s"
    cargo fuzz build -O "$t"
    mkdir -p "corpus/$t"
    status=0
    dict=""
    [ -f "dicts/$t.dict" ] && dict="-dict=dicts/$t.dict"
    # shellcheck disable=SC2086 # $dict is one word or none
    cargo fuzz run -O "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
        -print_final_stats=1 $dict >"logs/$t.log" 2>&1 || status=$?
    grep -E '^#[0-9]+ +DONE|^stat::number_of_executed_units|^stat::peak_rss_mb' "logs/$t.log" || true
    [ "$status" -eq 0 ] || echo "!! $t exited with $status: see fuzz/logs/$t.log and fuzz/artifacts/$t/"
done
