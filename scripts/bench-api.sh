#!/usr/bin/env bash
# tally-api benchmark (issue 10): wrk against GET /v1/usage (one org, 31 days, per day) and
# GET /v1/entitlements/{org} on a fixture of 1,000 orgs × 10 projects × 7 meters × 744 hours
# (the 31 days up to now: 44.6 M additive hourly rows, 7.4 M hourly unique-meter sketches and
# their daily merges), written straight into the aggregate tables of a database of its own. Writes target/bench/api.json.
# BENCH_API_SECS (default 20) per endpoint; about 3 minutes in all on 2 cores.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
"$ROOT/scripts/start.sh"
command -v wrk >/dev/null || { apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }; }
cargo build --release --locked --bins
SECS="${BENCH_API_SECS:-20}"
DB=tally_bench_api
OUT="$STATE/bench-api"; mkdir -p "$OUT" target/bench
ch() { curl -sS --fail-with-body "http://127.0.0.1:$CH_HTTP_PORT/" --data-binary "$1"; }
export TALLY_CLICKHOUSE_DATABASE=$DB TALLY_CLICKHOUSE_URL="http://127.0.0.1:$CH_HTTP_PORT"
ch "DROP DATABASE IF EXISTS $DB"
# No worker writes the fixture's database.
target/release/tally-ingest --config config/ingest.example.toml migrate --ingestion-stopped >/dev/null
NOW=$(date +%s); BASE=$(( NOW / 3600 * 3600 - 743 * 3600 ))
log "fixture: 1,000 orgs × 10 projects × 7 meters × 744 hours from $(date -u -d @$BASE +%FT%TZ)"
START=$(date +%s)
ch "INSERT INTO $DB.usage_hourly_agg
    SELECT concat('org-', toString(intDiv(number, 44640))), concat('proj-', toString(intDiv(number, 4464) % 10)),
           ['events','traces','observations','scores','input_tokens','output_tokens'][intDiv(number, 744) % 6 + 1],
           toDateTime($BASE + (number % 744) * 3600), (number * 2654435761) % 1000
    FROM numbers(44640000)"
ch "INSERT INTO $DB.usage_unique_hourly
    SELECT concat('org-', toString(intDiv(number, 7440))), concat('proj-', toString(intDiv(number, 744) % 10)),
           'unique_users', toDateTime($BASE + (number % 744) * 3600),
           arrayReduce('uniqCombinedState', arrayMap(x -> toUInt64(x + (number % 97) * 50), range(20)))
    FROM numbers(7440000)"
ch "INSERT INTO $DB.usage_unique_daily
    SELECT org_id, project_id, meter, toDateTime(intDiv(toUInt32(hour), 86400) * 86400) AS day, uniqCombinedMergeState(state)
    FROM $DB.usage_unique_hourly GROUP BY org_id, project_id, meter, day"
# Merged before measuring (a settled month, as past hours are in production; background merges of
# a fresh 52 M-row insert would otherwise take the CPU the queries are measured on).
ch "OPTIMIZE TABLE $DB.usage_hourly_agg FINAL"
ch "OPTIMIZE TABLE $DB.usage_unique_hourly FINAL"
ch "OPTIMIZE TABLE $DB.usage_unique_daily FINAL"
ROWS=$(ch "SELECT (SELECT count() FROM $DB.usage_hourly_agg) + (SELECT count() FROM $DB.usage_unique_hourly)")
log "fixture: $ROWS rows in $(( $(date +%s) - START )) s"
# Background merges anywhere on the server (the ingest bench's databases, just before this in
# scripts/bench.sh) would take the CPU the queries are measured on: wait for them, at most 10 min.
WAIT=$(date +%s)
for _ in $(seq 600); do [ "$(ch "SELECT count() FROM system.merges")" = 0 ] && break; sleep 1; done
MERGE_WAIT=$(( $(date +%s) - WAIT )); PENDING=$(ch "SELECT count() FROM system.merges")
log "background merges: waited $MERGE_WAIT s, $PENDING still running"

KEYS="$OUT/keys"; rm -rf "$KEYS"
target/release/tally-ingest --config config/ingest.example.toml keygen --dir "$KEYS" --orgs 1 --projects-per-org 1 2>/dev/null
cat >"$OUT/plans.toml" <<TOML
default_plan = "bench"
[plans.bench.meters.events]
limit = 1000000
enforcement = "hard"
thresholds = [80, 100]
[plans.bench.meters.input_tokens]
limit = 5000000
thresholds = [80, 100, 120]
[plans.bench.meters.unique_users]
limit = 10000
thresholds = [80, 100]
TOML
ADDR="127.0.0.1:$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
TALLY_API_LISTEN="$ADDR" TALLY_API_PLANS_PATH="$OUT/plans.toml" TALLY_METRICS_LISTEN= TALLY_NOTIFY_ENABLED=false \
  TALLY_AUTH_JWKS_PATH="$KEYS/jwks.json" TALLY_AUTH_API_KEYS_PATH="$KEYS/api_keys.json" RUST_LOG=warn \
  target/release/tally-api --config config/api.example.toml serve 2>"$OUT/api.log" & API=$!
trap 'kill $API 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://$ADDR/healthz" >/dev/null && break; sleep 0.1; done
export TALLY_BENCH_TOKEN=$(target/release/tally-ingest token --dir "$KEYS" --org ops --scope usage:admin --ttl-secs 3600)
FROM=$(date -u -d @$BASE +%FT%H); TO=$(date -u -d @$(( BASE + 744 * 3600 )) +%FT%H)
USAGE="/v1/usage?from=$FROM&to=$TO&org_id={org}&window=day"
curl -sf -H "authorization: Bearer $TALLY_BENCH_TOKEN" "http://$ADDR${USAGE/\{org\}/org-7}" >"$OUT/usage-sample.json"
curl -sf -H "authorization: Bearer $TALLY_BENCH_TOKEN" "http://$ADDR/v1/entitlements/org-7" >"$OUT/entitlements-sample.json"
run() { # name path connections
  log "wrk: $1 ($SECS s, $3 connections)"
  TALLY_BENCH_PATH="$2" wrk -t"$(( $3 < 2 ? 1 : 2 ))" -c"$3" -d"${SECS}s" --latency -s scripts/wrk_api.lua "http://$ADDR" >"$OUT/$1-$3.txt"
  grep '^JSON ' "$OUT/$1-$3.txt" | sed 's/^JSON //'
}
U1=$(run usage "$USAGE" 1); U8=$(run usage "$USAGE" 8)
E1=$(run entitlements "/v1/entitlements/{org}" 1); E8=$(run entitlements "/v1/entitlements/{org}" 8)
python3 - "$OUT" "$ROWS" <<PY
import json, sys
out, rows = sys.argv[1], int(sys.argv[2])
usage = json.load(open(out + "/usage-sample.json"))
# 7 meters × every UTC day the 744 hours touch (31, or 32 when the range starts after midnight).
days = len({(int("$BASE") + h * 3600) // 86400 for h in range(744)})
assert len(usage["data"]) == 7 * days, (len(usage["data"]), days)
res = {"fixture_rows": rows, "fixture": "1,000 orgs x 10 projects x 7 meters x 744 hours",
       "merge_wait_s": $MERGE_WAIT, "merges_running_at_start": $PENDING,
       "usage_path": "$USAGE", "usage": {"c1": json.loads('$U1'), "c8": json.loads('$U8')},
       "entitlements": {"c1": json.loads('$E1'), "c8": json.loads('$E8')}}
for k in ("usage", "entitlements"):
    for c in ("c1", "c8"):
        assert res[k][c]["non_2xx"] == 0 and res[k][c]["socket_errors"] == 0, res[k][c]
json.dump(res, open("target/bench/api.json", "w"), indent=2)
print(json.dumps(res, indent=2))
PY
