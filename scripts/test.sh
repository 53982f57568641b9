#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need,
# checks formatting and lints, runs the Rust tests, builds Postern, and runs the
# system tests against real Dovecot with real clients. `.ci/run` runs exactly this.
#
# Extra arguments go to pytest, e.g. `scripts/test.sh -k starttls`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_cargo

scripts/install-deps.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -q -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked -q
echo "==> protocol crates stay sans-IO"
scripts/check-sans-io.sh
echo "==> building postern"
cargo build --locked -q -p postern

echo "==> system tests"
export POSTERN_BIN="$PWD/target/debug/postern"
.venv/bin/python -m pytest -c tests/pytest.ini tests "$@"
