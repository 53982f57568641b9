#!/usr/bin/env bash
# bench-idle.sh: the idle-memory rows of bench-compare.sh for one or more Postern
# builds, alternated, without nginx and HAProxy: a before/after of a change.
#
# Starts the bench's fake backend, then for each round and each build a fresh Postern
# (the configuration and route table bench-compare.sh gives it), runs `postern-bench
# idle` against it and stops it. Fresh each time: memory an earlier run freed stays in
# the allocator and would make new sessions look free.
#
#   scripts/bench-idle.sh OLD_POSTERN NEW_POSTERN            # plaintext, 4000,8000, 2 rounds
#   scripts/bench-idle.sh --tls --sizes 2000 --rounds 1 BIN  # implicit TLS
#   scripts/bench-idle.sh --bench PATH --out DIR ...         # postern-bench; where results go
#
# Each build is labelled by its path in DIR/results.jsonl (`name`); DIR/run.log has
# the human summaries, one line per size with KiB per session and the marginal figure.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
sizes=4000,8000 rounds=2 tls=0 out="" conc=128
bench=${CARGO_TARGET_DIR:-$here/target}/release/postern-bench
builds=()
while [ $# -gt 0 ]; do
    case $1 in
        --sizes) sizes=$2; shift ;;
        --rounds) rounds=$2; shift ;;
        --tls) tls=1 ;;
        --bench) bench=$2; shift ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
        *) builds+=("$1") ;;
    esac
    shift
done
die() { echo "bench-idle: $*" >&2; exit 1; }
[ ${#builds[@]} -gt 0 ] || die "name at least one postern binary (see --help)"
for b in "${builds[@]}" "$bench"; do [ -x "$b" ] || die "not executable: $b"; done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
max=${sizes##*,}
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge $((2 * max + 200)) ] \
    || die "open-files limit $(ulimit -n) is too low for $max proxied sessions"

. "$here/scripts/bench-lib.sh"
bench_begin idle

"$bench" fake-backend > "$tmp/backend.out" 2> "$tmp/backend.err" &
started[backend]=$!
wait_for "$tmp/backend.out" '"event":"ready"' "the fake backend"
f_imap=$(json_port "$tmp/backend.out" imap)
f_pop3=$(json_port "$tmp/backend.out" pop3)
# bench-compare.sh's Postern, both backends on the fake one.
bench_seeded_postern "$f_imap" "$f_pop3" "$f_imap" "$f_pop3" 100

listener=imap scenario=idle-plain opts=()
[ "$tls" = 1 ] && listener=imaps scenario=idle-tls opts=(--tls implicit --ca "$tmp/tls/ca.pem")
measure() { # measure BUILD ADDR PID
    "$bench" idle --name "$1" --scenario "$scenario" --pid "$3" \
        "${opts[@]}" --addr "$2" --sessions "$sizes" --concurrency "$conc" \
        >> "$results" 2> >(tee -a "$log" >&2)
}
say "load $(cut -d' ' -f1-3 /proc/loadavg); $scenario at $sizes, $rounds rounds of ${builds[*]}"
bench_rounds "$listener" measure
say "load $(cut -d' ' -f1-3 /proc/loadavg) at the end; results in $out"
