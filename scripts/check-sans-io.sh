#!/usr/bin/env bash
# The protocol crates must stay free of I/O: no tokio, no sqlx, no sockets. This is
# what keeps every protocol rule unit-testable and fuzzable. A `cargo tree` that fails
# fails this check too: silence is not a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
checked=0
for crate in postern-proto postern-imap postern-pop3 postern-smtp postern-limits postern-auth; do
    if ! tree=$(cargo tree --locked -e normal -p "$crate" --prefix none 2>&1); then
        echo "error: cargo tree failed for $crate:" >&2
        echo "$tree" | tail -5 >&2
        exit 1
    fi
    if ! echo "$tree" | grep -q "^$crate "; then
        echo "error: cargo tree printed nothing about $crate" >&2
        exit 1
    fi
    if echo "$tree" | grep -qE '^(tokio|sqlx|mio|socket2|rustls) '; then
        echo "error: $crate depends on an I/O crate:" >&2
        cargo tree -e normal -p "$crate" -i tokio 2>/dev/null | head -5 >&2 || true
        status=1
    fi
    checked=$((checked + 1))
done
[ "$status" = 0 ] && echo "sans-IO: $checked crates free of tokio, sqlx, mio, socket2 and rustls"

# Policy modules inside crates that do I/O elsewhere: the move protocol, the health
# model, admission, blame and the login plan decide, the runtime executes. The clock comes in as an
# argument, so they are tested on a simulated one: no I/O crate, no clock read outside
# their tests.
modules=0
for module in crates/postern-route/src/fence.rs crates/postern-server/src/backends/service_health.rs \
    crates/postern-server/src/backends/admission.rs crates/postern-server/src/backends/blame.rs \
    crates/postern-server/src/login/plan.rs; do
    if [ ! -f "$module" ]; then
        echo "error: $module is missing" >&2
        exit 1
    fi
    if sed '/^#\[cfg(test)\]/,$d' "$module" \
        | grep -nE '\b(tokio|sqlx|mio|socket2|std::net|std::fs|std::io)\b|Instant::now\(|SystemTime::now\(' >&2; then
        echo "error: $module does I/O or reads the clock (lines above)" >&2
        status=1
    fi
    modules=$((modules + 1))
done
[ "$status" = 0 ] && echo "sans-IO: $modules policy modules free of I/O crates and clock reads"
exit $status
