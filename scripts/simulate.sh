#!/usr/bin/env bash
# The move protocol's deterministic simulation, longer than `cargo test` runs it:
#   scripts/simulate.sh            # 100 000 seeds, release build
#   scripts/simulate.sh 1000000    # more
#   POSTERN_SIM_SEED=4711 cargo test -p postern-route --test simulation   # replay one
# A failure prints its seed and the last steps (crates/postern-route/tests/simulation.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_cargo
seeds=${1:-100000}
echo "simulating $seeds seeds"
start=$(date +%s)
POSTERN_SIM_SEEDS=$seeds cargo test --release --locked -p postern-route --test simulation \
    no_user_is_ever_on_two_backends
echo "$seeds seeds in $(( $(date +%s) - start )) s"
