#!/usr/bin/env bash
# The protocol crates must stay free of I/O: no tokio, no sqlx, no sockets. This is
# what keeps every protocol rule unit-testable and fuzzable.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for crate in postern-proto postern-imap postern-pop3 postern-smtp postern-limits postern-auth; do
    if cargo tree -e normal -p "$crate" --prefix none 2>/dev/null \
        | grep -qE '^(tokio|sqlx|mio|socket2|rustls) '; then
        echo "error: $crate depends on an I/O crate:" >&2
        cargo tree -e normal -p "$crate" -i tokio 2>/dev/null | head -5 >&2 || true
        status=1
    fi
done
exit $status
