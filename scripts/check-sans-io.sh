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
# The runtime crate's decision modules (health, admission, blame) are pure too: the
# clock comes in as an argument, so they are tested on a simulated one.
for module in service_health admission blame; do
    file=crates/postern-server/src/$module.rs
    if [ ! -f "$file" ]; then
        echo "error: $file is missing" >&2
        exit 1
    fi
    if grep -nE '\b(tokio|sqlx|mio|socket2|std::net|std::fs|std::io|Instant::now|SystemTime::now)\b' \
        <(sed '/^#\[cfg(test)\]/,$d' "$file") >&2; then
        echo "error: $file does I/O or reads the clock (above)" >&2
        status=1
    fi
    checked=$((checked + 1))
done
[ "$status" = 0 ] && echo "sans-IO: $checked crates and modules free of tokio, sqlx, mio, socket2 and rustls"
exit $status
