#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need,
# checks that every program the tests call works (scripts/preflight.sh), checks
# formatting and lints, runs the Rust tests, builds Postern, and runs the
# system tests against real Dovecot with real clients. `.ci/run` runs exactly this.
#
# Extra arguments go to pytest, e.g. `scripts/test.sh -k starttls`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_cargo

phase "installing what the tests need (scripts/install-deps.sh)"
scripts/install-deps.sh
phase "preflight: the programs the tests call, and what they can do"
scripts/preflight.sh

phase "cargo fmt --check"
cargo fmt --all -- --check
phase "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
phase "cargo test"
cargo test --workspace --locked
phase "protocol crates stay sans-IO"
scripts/check-sans-io.sh
phase "building postern"
cargo build --locked -p postern

phase "system tests"
export POSTERN_BIN="$PWD/target/debug/postern"
.venv/bin/python -m pytest -c tests/pytest.ini tests "$@"
