#!/usr/bin/env bash
# The throughput benchmark (issue 9), one command: starts the services, runs
#   cargo bench --bench pipeline   the core without I/O, with serde_json's IgnoredAny pass as yardstick
#   cargo bench --bench ingest     raw consume, 1 and 2 workers, replay, plain vs aggregated insert
#   scripts/bench-api.sh           wrk against tally-api on a 1,000-org fixture
# in one run, and writes docs/benchmarks.md with a table and docs/benchmarks.png.
# BENCH_EVENTS (default 1,000,000) and BENCH_ROUNDS (default 2) size the run; ~12 min on 2 cores.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# The report needs every pass (benches/ingest.rs: BENCH_FIRST_ONLY stops after the first passes).
unset BENCH_FIRST_ONLY
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
# Where ClickHouse keeps its data, and on what kind of filesystem (docs/services.md).
CH_DATA_DIR=$(cat "$STATE/clickhouse/data_dir" 2>/dev/null || echo unknown)
CH_FS=$(stat -f -c %T "$CH_DATA_DIR" 2>/dev/null || echo unknown)
case $CH_FS in
  tmpfs) CH_NOTE="in memory (tmpfs); on this machine's disk, ext4 without a journal, the kernel's inode allocation for each part's files was half of the server's CPU on inserts and the aggregates cost far more (docs/measurements.md, \"The views skip counted rows\")" ;;
  *) CH_NOTE="on disk (\`stat -f\` names its filesystem $CH_FS)" ;;
esac
BENCH_CH_DATA="\`$CH_DATA_DIR\`, $CH_NOTE" "$PY" "$ROOT/scripts/bench_report.py" target/bench docs/benchmarks.md docs/benchmarks.png
log "wrote docs/benchmarks.md and docs/benchmarks.png"
