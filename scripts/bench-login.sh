#!/usr/bin/env bash
# bench-login.sh: the login-CPU rows of bench-compare.sh --dovecot for one or more
# Postern builds, alternated, without nginx and HAProxy: a before/after of a change.
#
# Starts two real Dovecot backends (bench-compare.sh's configuration), then for each
# round and each build a fresh Postern (the bench's configuration and route table), logs
# every user in once (the route cache warm-up), runs `postern-bench logins` against it
# and stops it. Each build's proxy CPU per session is in DIR/results.jsonl under its
# path (`name`); DIR/run.log has the human summaries.
#
#   scripts/bench-login.sh OLD_POSTERN NEW_POSTERN          # IMAP, 3000 at 200/s, 3 rounds
#   scripts/bench-login.sh --pop3 --sessions 2000 --rounds 2 BIN
#   scripts/bench-login.sh --bench PATH --out DIR ...       # postern-bench; where results go
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
sessions=3000 rate=200 rounds=3 protocol=imap out=""
bench=${CARGO_TARGET_DIR:-$here/target}/release/postern-bench
builds=()
while [ $# -gt 0 ]; do
    case $1 in
        --sessions) sessions=$2; shift ;;
        --rate) rate=$2; shift ;;
        --rounds) rounds=$2; shift ;;
        --pop3) protocol=pop3 ;;
        --bench) bench=$2; shift ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
        *) builds+=("$1") ;;
    esac
    shift
done
die() { echo "bench-login: $*" >&2; exit 1; }
[ ${#builds[@]} -gt 0 ] || die "name at least one postern binary (see --help)"
for b in "${builds[@]}" "$bench"; do [ -x "$b" ] || die "not executable: $b"; done
command -v dovecot > /dev/null || die "dovecot is not installed (scripts/install-deps.sh)"

. "$here/scripts/bench-lib.sh"
bench_begin login

# Dovecot's unprivileged processes read their users file under the temp dir.
chmod 711 "$tmp"
users=100
for name in b1 b2; do
    bench_start_dovecot "$name" "$tmp/dovecot" "$users"
    started[dovecot_$name]=$bench_dovecot_pid
done
read -r d1_imap d1_pop3 < "$tmp/dovecot/b1/ports"
read -r d2_imap d2_pop3 < "$tmp/dovecot/b2/ports"
bench_seeded_postern "$d1_imap" "$d1_pop3" "$d2_imap" "$d2_pop3" "$users"

measure() { # measure BUILD ADDR PID
    "$bench" logins --name "$1" --scenario "$protocol-login" --protocol "$protocol" \
        --pid "$3" --addr "$2" --sessions "$sessions" --rate "$rate" \
        >> "$results" 2> >(tee -a "$log" >&2)
}
say "load $(cut -d' ' -f1-3 /proc/loadavg); $protocol logins, $sessions at $rate/s, $rounds rounds of ${builds[*]}"
bench_rounds "$protocol" measure
say "load $(cut -d' ' -f1-3 /proc/loadavg) at the end; results in $out"
