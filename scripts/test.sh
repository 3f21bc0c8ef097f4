#!/usr/bin/env bash
# The whole test suite: installs and starts the services (idempotent), then runs every test.
# Usage: scripts/test.sh   (what .ci/run calls)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/start.sh
scripts/check-chdb.sh
scripts/check-alerts.sh
# Integration tests spawn workers and use real topics; run them one at a time on 2 cores.
cargo test --release --locked -- --test-threads=1
# Every fuzz target for a fixed time from its seed corpus (fails on a crash or a broken invariant).
scripts/fuzz.sh 20
