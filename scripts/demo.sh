#!/usr/bin/env bash
# The demo: services up, schema, sample traffic (duplicates, forged/expired/revoked credentials,
# malformed and oversized messages), one worker until caught up, then the usage table and the
# dead-letter counts by reason; then tally-invoicer reconciles the month with the local Stripe
# emulator (dry run, --apply, and a rerun that has nothing to do), and tally-api answers one org's
# usage and entitlements. Each run uses its own topics, group and database.
# Usage: scripts/demo.sh [EVENTS]   (default 50000)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EVENTS="${1:-50000}"
scripts/start.sh
cargo build --release --locked --bins
BIN=target/release/tally-ingest
RUN="demo$(date +%s)"
export TALLY_CONFIG=config/ingest.example.toml
export TALLY_KAFKA_TOPIC="trace-events-$RUN" TALLY_KAFKA_DLQ_TOPIC="trace-events-$RUN.rejected"
export TALLY_KAFKA_GROUP_ID="tally-ingest-$RUN" TALLY_CLICKHOUSE_DATABASE="tally_$RUN"
export RUST_LOG="${RUST_LOG:-info,librdkafka=error}" RUST_BACKTRACE=0
TALLYDEV_TOPICS="$TALLY_KAFKA_TOPIC $TALLY_KAFKA_DLQ_TOPIC" scripts/start.sh
[[ -f config/dev/dev-keys.private.json ]] || $BIN keygen --dir config/dev
$BIN migrate
OUT=".local/$RUN"; mkdir -p "$OUT"
$BIN generate --events "$EVENTS" --expected "$OUT/expected.json"
$BIN run 2>"$OUT/worker.log" & WORKER=$!
trap 'kill $WORKER 2>/dev/null || true' EXIT
START=$(date +%s.%N)
$BIN offsets --wait-for "$OUT/expected.json" --timeout-secs 600 >/dev/null
END=$(date +%s.%N)
kill -TERM $WORKER; wait $WORKER
echo
echo "== caught up in $(python3 -c "print(round($END - $START, 1))") s; metrics of the worker were served on 127.0.0.1:9464"
echo
echo "== tally.usage_hourly, totals per org and meter (top 12 orgs by events)"
clickhouse-client --port "${TALLYDEV_CH_TCP_PORT:-9000}" --database "$TALLY_CLICKHOUSE_DATABASE" --format PrettyCompact --query "
  SELECT org_id,
         sumIf(value, meter = 'events') AS events, sumIf(value, meter = 'traces') AS traces,
         sumIf(value, meter = 'observations') AS observations, sumIf(value, meter = 'scores') AS scores,
         sumIf(value, meter = 'input_tokens') AS input_tokens, sumIf(value, meter = 'output_tokens') AS output_tokens
  FROM usage_hourly GROUP BY org_id ORDER BY events DESC LIMIT 12"
echo
echo "== unique_users per org over the whole run (merged sketches)"
clickhouse-client --port "${TALLYDEV_CH_TCP_PORT:-9000}" --database "$TALLY_CLICKHOUSE_DATABASE" --format PrettyCompact --query "
  SELECT org_id, uniqCombinedMerge(state) AS unique_users FROM usage_unique_hourly GROUP BY org_id ORDER BY org_id LIMIT 12"
echo
echo "== compared with the generator's expectation"
python3 - "$OUT/expected.json" "$TALLY_CLICKHOUSE_DATABASE" "${TALLYDEV_CH_HTTP_PORT:-8123}" <<'PY'
import json, sys, urllib.request
exp = json.load(open(sys.argv[1]))
q = "SELECT org_id, project_id, meter, toUInt32(hour), value FROM usage_hourly FORMAT TabSeparated"
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[3]}/?database={sys.argv[2]}", data=q.encode())
got = {tuple(l.split("\t")[:4]): int(l.split("\t")[4]) for l in urllib.request.urlopen(req).read().decode().splitlines()}
want = {(o, p, m, str(h)): v for o, p, m, h, v in exp["totals"]}
bad = [k for k in set(got) | set(want) if got.get(k) != want.get(k)]
print(f"{len(want)} (org, project, meter, hour) totals expected, {len(bad)} differ -> {'EXACT' if not bad else 'MISMATCH'}")
print(f"events: {exp['events']} produced, {exp['accepted']} accepted, {exp['duplicates']} duplicates, {exp['rejected_events']} rejected")
sys.exit(1 if bad else 0)
PY
echo
echo "== dead-letter topic $TALLY_KAFKA_DLQ_TOPIC by reason"
$BIN dead-letters

echo
echo "== tally-invoicer against the local Stripe emulator"
INV=target/release/tally-invoicer
target/release/tally-stripe-emulator --listen 127.0.0.1:0 --api-key sk_test_tally_demo 2>"$OUT/emulator.log" & EMU=$!
trap 'kill $WORKER $EMU ${API:-} 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q listening "$OUT/emulator.log" && break; sleep 0.1; done
EMU_URL=$(grep -o 'http://[0-9.:]*/' "$OUT/emulator.log")
export TALLY_INVOICER_CONFIG=config/invoicer.example.toml
export TALLY_STRIPE_API_BASE="$EMU_URL" TALLY_STRIPE_API_KEY=sk_test_tally_demo
export TALLY_STRIPE_MAX_REQUESTS_PER_SEC=2000 TALLY_BILLING_MAPPING_PATH="$OUT/billing.toml" TALLY_METRICS_LISTEN=
# The period: this month, or the last 31 days when the month is younger than the sample data.
FROM=$(date -u -d '-4 days' +%Y-%m-01T00); TO=$(date -u -d 'tomorrow' +%Y-%m-%dT00)
$INV provision --from "$FROM" --to "$TO" --write-mapping "$OUT/billing.toml"
echo "-- reconcile (dry run: the plan; exit 2 = there is something to push)"
$INV reconcile --from "$FROM" --to "$TO" > "$OUT/plan.txt" && echo "exit 0" || echo "exit $?"
head -n 4 "$OUT/plan.txt"; grep '^dry run' "$OUT/plan.txt"
echo "-- reconcile --apply"
$INV reconcile --from "$FROM" --to "$TO" --apply --metrics-textfile "$OUT/invoicer.prom" > "$OUT/report.txt"
head -n 15 "$OUT/report.txt"; echo "   ... ($OUT/report.txt)"; grep '^applied' "$OUT/report.txt"
echo "-- reconcile --apply again: nothing to push"
$INV reconcile --from "$FROM" --to "$TO" --apply | grep '^applied'
echo "(finance report as CSV: $INV reconcile --from $FROM --to $TO --format csv; metrics: $OUT/invoicer.prom)"
CUS=$(grep -m1 -o 'cus_[A-Za-z0-9]*' "$OUT/billing.toml")
echo "-- explain one invoice line: $CUS, meter events (writes, buckets, projects behind it)"
$INV explain --customer "$CUS" --meter events --from "$FROM" --to "$TO" | head -n 8
echo "   ... (--format json for all of it; --events <hour> for the events behind an hour)"

echo
echo "== tally-api: one org's usage and entitlements, from the same aggregates"
API_ADDR="127.0.0.1:$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
TALLY_API_LISTEN="$API_ADDR" target/release/tally-api --config config/api.example.toml serve 2>"$OUT/api.log" & API=$!
for _ in $(seq 100); do curl -sf "http://$API_ADDR/healthz" >/dev/null && break; sleep 0.1; done
ORG=$(python3 -c "import json; print(json.load(open('config/dev/dev-keys.private.json'))['tenants'][0]['org_id'])")
TOKEN=$($BIN token --dir config/dev --org "$ORG" --scope usage:read)
sleep 2 # complete_until comes from the first read of the ingest group's offsets
echo "-- GET /v1/usage?from=$FROM&to=$TO  (org $ORG, with an org-wide usage:read token)"
curl -sf -H "authorization: Bearer $TOKEN" "http://$API_ADDR/v1/usage?from=$FROM&to=$TO" | python3 -c '
import json, sys
a = json.load(sys.stdin)
for r in a["data"]:
    print("   %-10s %-14s %12d%s" % (r["org_id"], r["meter"], r["value"], "  (approximate)" if r["approximate"] else ""))
print("   complete_until %s   final_until %s" % (a["complete_until"], a["final_until"]))'
echo "-- GET /v1/entitlements/$ORG  (plans: config/plans.toml)"
curl -sf -H "authorization: Bearer $TOKEN" "http://$API_ADDR/v1/entitlements/$ORG" | python3 -c '
import json, sys
a = json.load(sys.stdin)
print("   plan %s, has_access %s" % (a["plan"], a["has_access"]))
for e in a["entitlements"]:
    print("   %-14s used %10d of %10d (%s) -> %s, period %s .. %s" % (e["meter"], e["used"], e["limit"], e["enforcement"], e["state"], e["period_start"], e["period_end"]))'
echo "(OpenAPI document: http://$API_ADDR/openapi.json; docs/api.md)"
