#!/usr/bin/env python3
"""What the materialized views cost ClickHouse on insert (issue 9; docs/measurements.md).

The same 900,000 synthetic narrow rows (10 orgs x 60 projects, 2 or 4 additive meters and one
user hash per event, spread over WINDOW seconds) are inserted as 12 RowBinary inserts of 75,000
rows into four databases made from schemas/001_events.sql: the events table alone, events + the
sum view, events + the unique view, and the whole schema. Three interleaved rounds; prints each
target's times and its best time as a ratio to the plain insert.

Usage: scripts/measure-mv-cost.py [WINDOW_SECS] [sorted|shuffled]   (ClickHouse on 127.0.0.1:8123;
drops and creates the databases exp9_*)."""
import os, re, sys, time, urllib.parse, urllib.request

CH = os.environ.get("TALLYDEV_CLICKHOUSE_URL", "http://127.0.0.1:8123/").rstrip("/") + "/"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = int(sys.argv[1]) if len(sys.argv) > 1 else 86400
ORDER = "key_hash" if len(sys.argv) > 2 and sys.argv[2] == "shuffled" else "event_id"
ROWS, BATCH = 900_000, 75_000

def q(sql, data=None):
    url = CH + "?query=" + urllib.parse.quote(sql)
    req = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read()

schema = open(f"{ROOT}/schemas/001_events.sql").read()
stmts = [s.strip() for s in re.sub(r"--[^\n]*", "", schema).split(";") if s.strip()]

def make(db, keep):
    q(f"DROP DATABASE IF EXISTS {db}")
    for s in stmts:
        s = s.replace("${database}", db)
        if s.startswith("CREATE DATABASE") or ("TABLE IF NOT EXISTS " + db + ".events") in s:
            q(s)
        elif any(k in s for k in keep):
            q(s)

targets = {
    "plain": [],
    "sum_mv": [f".usage_hourly_agg\n", "usage_hourly_mv"],
    "uniq_mv": [".usage_unique_hourly\n", "usage_unique_hourly_mv"],
    "both": [".usage_hourly_agg\n", "usage_hourly_mv", ".usage_unique_hourly\n", "usage_unique_hourly_mv"],
}
for name, keep in targets.items():
    make(f"exp9_{name}", keep)
print({n: q(f"SELECT count() FROM system.tables WHERE database = 'exp9_{n}'").decode().strip() for n in targets})

# Source rows shaped like the bench's: 10 orgs x 6 projects, 4-6 meters per event, one user hash.
make("exp9_src", [])
q(f"""INSERT INTO exp9_src.events SELECT
  concat('org-', toString(number % 10)), concat('proj-', toString(number % 60)), concat('evt-', toString(number)),
  if(number % 3 = 0, 'generation-create', 'trace-create'),
  toDateTime(1795860000 + number * 7919 % {WINDOW}), toDateTime(1795860000 + intDiv(number * 7919 % {WINDOW}, 3600) * 3600),
  sipHash64(number),
  if(number % 3 = 0, ['events', 'observations', 'input_tokens', 'output_tokens'], ['events', 'traces']),
  if(number % 3 = 0, [1, 1, number % 5000, number % 700], [1, 1]),
  ['unique_users'], [cityHash64(number % 5000)],
  't', toUInt32(number % 12), number, -1, now()
  FROM system.numbers LIMIT {ROWS}""")
batches = [q(f"SELECT * FROM exp9_src.events ORDER BY {ORDER} LIMIT {BATCH} OFFSET {i * BATCH} FORMAT RowBinary")
           for i in range(ROWS // BATCH)]
print("batch bytes", sum(map(len, batches)) // len(batches))

times = {n: [] for n in targets}
for rnd in range(3):
    for name in targets:
        q(f"TRUNCATE TABLE exp9_{name}.events")
        for t in ("usage_hourly_agg", "usage_unique_hourly"):
            try:
                q(f"TRUNCATE TABLE exp9_{name}.{t}")
            except Exception:
                pass
        t0 = time.time()
        for b in batches:
            q(f"INSERT INTO exp9_{name}.events FORMAT RowBinary", b)
        times[name].append(time.time() - t0)
for name, ts in times.items():
    print(f"{name:8} " + " ".join(f"{t:.2f}" for t in ts) + f"   best {min(ts):.2f} s   x plain {min(ts) / min(times['plain']):.2f}")
