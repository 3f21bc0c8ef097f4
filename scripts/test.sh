#!/usr/bin/env bash
# The whole test suite: installs and starts the services (idempotent), then runs every test.
# Usage: scripts/test.sh   (what .ci/run calls)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/start.sh
# The databases of earlier test runs (it_*: each test's own, kept for inspection until the next
# run) are dropped, so that ClickHouse's data, in memory by default (docs/services.md), does not
# grow run after run.
source scripts/lib.sh
# A database is named it_<test>_<pid>_<stamp>: one whose process still runs (a benchmark, another
# test run) is left alone.
if dbs=$(clickhouse-client --port "$CH_TCP_PORT" -q "SELECT name FROM system.databases WHERE startsWith(name, 'it_')"); then
  for db in $dbs; do
    pid=${db%_*}
    pid=${pid##*_}
    [[ $pid =~ ^[0-9]+$ && -d /proc/$pid ]] && continue
    clickhouse-client --port "$CH_TCP_PORT" -q "DROP DATABASE IF EXISTS \`$db\`" || log "could not drop $db"
  done
else
  log "could not list the databases of earlier test runs; left as they are"
fi
cargo test --release --locked --no-run
# The fuzz targets build meanwhile at the lowest CPU priority: they take the cores the tests
# leave idle while they wait on ClickHouse, the broker and their own timeouts. Their own session
# (setsid) with its autogroup at nice 19: with kernel.sched_autogroup_enabled (Debian's default)
# plain `nice` only ranks processes within one session, and ClickHouse and tansu run in sessions
# of their own (scripts/start.sh). Their own target dir: no lock shared with the test build.
fuzz_log="$(mktemp)"
setsid -w bash -c 'echo 19 >/proc/self/autogroup 2>/dev/null || true; exec nice -n 19 scripts/fuzz.sh --build-only' \
  >"$fuzz_log" 2>&1 &
fuzz_build=$!
trap 'kill -- -"$fuzz_build" 2>/dev/null || true; rm -f "$fuzz_log"' EXIT
scripts/check-chdb.sh
scripts/check-alerts.sh
# Integration tests spawn workers and use real topics; run them one at a time on 2 cores.
cargo test --release --locked -- --test-threads=1
if ! wait "$fuzz_build"; then
  echo "[fuzz] building the fuzz targets failed:" >&2
  tail -50 "$fuzz_log" >&2
  exit 1
fi
trap 'rm -f "$fuzz_log"' EXIT
# Every fuzz target for a fixed time from its seed corpus (fails on a crash or a broken invariant).
scripts/fuzz.sh 20
