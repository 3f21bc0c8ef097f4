#!/usr/bin/env bash
# The throughput benchmark (issue 9), one command: starts the services, runs
#   cargo bench --bench pipeline   the core without I/O, with serde_json's IgnoredAny pass as yardstick
#   cargo bench --bench ingest     raw consume, 1 and 2 workers, replay, plain vs aggregated insert
#   scripts/bench-api.sh           wrk against tally-api on a 1,000-org fixture
# in one run, and writes docs/benchmarks.md with a table and docs/benchmarks.png.
# BENCH_EVENTS (default 1,000,000) and BENCH_ROUNDS (default 2) size the run; ~12 min on 2 cores.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
"$ROOT/scripts/start.sh"
PY="$("$ROOT/scripts/venv.sh")"
MATPLOTLIB_VERSION="3.9.2"
if ! "$PY" -c "import matplotlib, sys; sys.exit(matplotlib.__version__ != '$MATPLOTLIB_VERSION')" 2>/dev/null; then
  log "installing matplotlib==$MATPLOTLIB_VERSION (plots only)"
  "${PY%/python}/pip" install --quiet "matplotlib==$MATPLOTLIB_VERSION"
fi
cargo bench --locked --bench pipeline
cargo bench --locked --bench ingest
"$ROOT/scripts/bench-api.sh"
"$PY" "$ROOT/scripts/bench_report.py" target/bench docs/benchmarks.md docs/benchmarks.png
log "wrote docs/benchmarks.md and docs/benchmarks.png"
