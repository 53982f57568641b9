#!/usr/bin/env bash
# The long fault suite (issue 16): the scenarios of tests/test_faults.py and
# tests/test_admission.py at FAULTS_SCALE=10 (200 looping IMAP clients against one
# Dovecot, 50 logins stranded on a frozen backend, 50 users behind a hung MariaDB,
# 300 MX messages with Postfix killed half-way). The normal suite runs the same
# tests at scale 1. Real Dovecot, Postfix and MariaDB, started by the test harness.
#
# Each scenario prints its counts (pytest -rP). Extra arguments go to pytest, e.g.
# `scripts/faults.sh -k overload`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_cargo

scripts/install-deps.sh
scripts/preflight.sh
phase "building postern"
cargo build --locked -p postern
phase "fault suite, FAULTS_SCALE=${FAULTS_SCALE:-10}"
export POSTERN_BIN="$PWD/target/debug/postern"
export FAULTS_SCALE="${FAULTS_SCALE:-10}"
.venv/bin/python -m pytest -c tests/pytest.ini tests/test_faults.py tests/test_admission.py \
    --timeout=1800 -rP "$@"
