#!/usr/bin/env bash
# Runs Postern's fuzz targets under libFuzzer (cargo-fuzz), each for a given time.
#
#   scripts/fuzz.sh [--merge] [SECONDS] [TARGET...]
#
# SECONDS per target (default 600); TARGETs default to all (see fuzz/fuzz_targets/).
# New inputs go to fuzz/work/TARGET (ignored by git); the committed seeds in
# fuzz/corpus/TARGET are read too. --merge folds the inputs that add coverage back into
# fuzz/corpus/TARGET, to be committed: `cargo test -p postern-fuzz` replays them.
# Crashes land in fuzz/artifacts/TARGET/. A summary line per target gives the exec count.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

merge=0
if [[ ${1:-} == --merge ]]; then
    merge=1
    shift
fi
secs=${1:-600}
shift || true
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    targets=()
    for f in fuzz/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

need_cargo
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
# libFuzzer needs nightly flags (-Z sanitizer). A nightly toolchain if there is one,
# else the stable compiler told to allow them, as rustls's CI does.
if rustup run nightly rustc --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi

status=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t" "fuzz/corpus/$t"
    log="fuzz/work/$t.log"
    echo "==> $t for ${secs}s (log: $log)"
    if ! (cd fuzz && "${fuzz[@]}" run "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1) >"$log" 2>&1; then
        echo "error: $t failed; see $log and fuzz/artifacts/$t/" >&2
        tail -30 "$log" >&2
        status=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
    if [[ $merge == 1 ]]; then
        (cd fuzz && "${fuzz[@]}" run "$t" "corpus/$t" "work/$t" -- -merge=1) \
            >>"$log" 2>&1 || true
    fi
    n=$(find "fuzz/corpus/$t" -type f | wc -l)
    summary+=("$t: ${execs:-?} execs (${rate:-?}/s), coverage ${cov:-?}, corpus $n files")
done
echo
printf '%s\n' "${summary[@]}"
exit $status
