#!/usr/bin/env bash
# Stops the quickstart started by deploy/local/up.sh. Keeps its data (routes, mail,
# certificates) unless called with --purge.
set -euo pipefail
cd "$(dirname "$0")/../.."
state=${POSTERN_QUICKSTART_DIR:-$PWD/var/quickstart}

stop_pid() {
    local pidfile=$1 pid i
    [ -s "$pidfile" ] || return 0
    pid=$(tr -dc '0-9' < "$pidfile")
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

for b in b1 b2; do
    stop_pid "$state/pf-$b/queue/pid/master.pid"
done
stop_pid "$state/postern.pid"
for b in b1 b2; do
    stop_pid "$state/$b/run/master.pid"
done
if [ "${1:-}" = "--purge" ]; then
    rm -rf "$state"
    echo "quickstart stopped and removed ($state)"
else
    echo "quickstart stopped (data kept in $state; --purge removes it)"
fi
