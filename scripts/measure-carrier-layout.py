#!/usr/bin/env python3
"""What carrier rows cost and save ClickHouse on insert, per column layout (issue 9;
docs/measurements.md, "Carrier rows").

Synthetic narrow rows shaped like the bench's (10 orgs x 60 projects, 2 or 4 additive meters and
one user hash per event, of 20 per project, spread over WINDOW seconds; 900,000 rows) are inserted as 12
RowBinary inserts of 75,000, each insert carrying its own carriers (one per (org, project, hour)
of the insert, on the group's last row; computed here in SQL as src/sink/carrier.rs computes them
in the worker), into:

  plain16   `events` as in schemas/001, no views
  views16   schemas/001 + 005: views over every event's meters (before carriers)
  plain21   `events` + five carrier columns (agg_kind, two arrays for sums, two for pairs)
  views21   ... + views over those
  plain19   `events` + three carrier columns (agg_additive, agg_meters, agg_values) = schema 006
  views19   ... + the views of schemas/006_carriers.sql

Three interleaved rounds; prints each target's best time as a ratio to plain16, and checks that
every variant with views holds the same totals.

Usage: scripts/measure-carrier-layout.py [WINDOW_SECS]   (ClickHouse on 127.0.0.1:8123; drops
and creates the databases exp_carrier_*)."""
import os, re, sys, time, urllib.parse, urllib.request

CH = os.environ.get("TALLYDEV_CLICKHOUSE_URL", "http://127.0.0.1:8123/").rstrip("/") + "/"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = int(sys.argv[1]) if len(sys.argv) > 1 else 86400
ROWS, BATCH = 900_000, 75_000


def q(sql, data=None):
    req = urllib.request.Request(CH + "?query=" + urllib.parse.quote(sql), data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise SystemExit(e.read().decode()[:600] + "\n" + sql[:300])


def statements(name):
    sql = re.sub(r"--[^\n]*", "", open(f"{ROOT}/schemas/{name}").read())
    return [s.strip() for s in sql.split(";") if s.strip()]


COLS = ("org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, unique_meters, "
        "unique_hashes, src_topic, src_partition, src_offset, batch_index, ingested_at")
C21 = COLS + ", agg_kind, agg_meters, agg_values, agg_unique_meters, agg_unique_hashes"
C19 = COLS + ", agg_additive, agg_meters, agg_values"
ADD21 = ("ALTER TABLE {db}.events ADD COLUMN agg_kind UInt8 DEFAULT 0, ADD COLUMN agg_meters Array(String), "
         "ADD COLUMN agg_values Array(UInt64), ADD COLUMN agg_unique_meters Array(String), "
         "ADD COLUMN agg_unique_hashes Array(UInt64)")
VIEWS21 = {
    "ARRAY JOIN meters AS meter, meter_values AS v":
        "ARRAY JOIN if(agg_kind = 0, meters, agg_meters) AS meter, if(agg_kind = 0, meter_values, agg_values) AS v",
    "ARRAY JOIN unique_meters AS meter, unique_hashes AS h":
        "ARRAY JOIN if(agg_kind = 0, unique_meters, agg_unique_meters) AS meter, "
        "if(agg_kind = 0, unique_hashes, agg_unique_hashes) AS h",
}


def make(db, variant):
    q(f"DROP DATABASE IF EXISTS {db}")
    base = [x.replace("${database}", db) for x in statements("001_events.sql") + statements("005_unique_daily.sql")]
    table = [x for x in base if x.startswith("CREATE DATABASE") or f"TABLE IF NOT EXISTS {db}.events\n" in x]
    rest = [x for x in base if x not in table and not x.startswith("INSERT")]
    for x in table:
        q(x)
    if variant.endswith("21"):
        q(ADD21.format(db=db))
    if variant.endswith("19"):
        for x in statements("006_carriers.sql"):
            if x.startswith("ALTER"):
                q(x.replace("${database}", db))
    if not variant.startswith("views"):
        return
    for x in rest:
        if variant == "views21":
            for a, b in VIEWS21.items():
                x = x.replace(a, b)
        q(x)
    if variant == "views19":
        for x in statements("006_carriers.sql"):
            if not x.startswith("ALTER"):
                q(x.replace("${database}", db))


# Source rows, then the carriers of each insert of BATCH rows (in SQL, as the worker computes them).
q("DROP DATABASE IF EXISTS exp_carrier_src")
q("CREATE DATABASE exp_carrier_src")
q(f"""CREATE TABLE exp_carrier_src.rows ENGINE = Memory AS SELECT
  concat('org-', toString(number % 10)) AS org_id, concat('proj-', toString(number % 60)) AS project_id,
  concat('evt-', toString(number)) AS event_id, if(number % 3 = 0, 'generation-create', 'trace-create') AS type,
  toDateTime(1795860000 + number * 7919 % {WINDOW}) AS ts,
  toDateTime(1795860000 + intDiv(number * 7919 % {WINDOW}, 3600) * 3600) AS hour, sipHash64(number) AS key_hash,
  if(number % 3 = 0, ['events', 'observations', 'input_tokens', 'output_tokens'], ['events', 'traces']) AS meters,
  CAST(if(number % 3 = 0, [1, 1, number % 5000, number % 700], [1, 1]) AS Array(UInt64)) AS meter_values,
  ['unique_users'] AS unique_meters, [cityHash64(number % 60, intDiv(number, 7) % 20)] AS unique_hashes,
  't' AS src_topic, toUInt32(number % 12) AS src_partition, number AS src_offset, toInt32(-1) AS batch_index,
  now() AS ingested_at, intDiv(number, {BATCH}) AS chunk, number AS seq
  FROM system.numbers LIMIT {ROWS}""")
# ClickHouse 18.16 takes one JOIN per SELECT: nested.
q(f"""CREATE TABLE exp_carrier_src.groups ENGINE = Memory AS SELECT chunk, org_id, project_id, hour, last, sm, sv, um, uh FROM
  (SELECT chunk, org_id, project_id, hour, max(seq) AS last FROM exp_carrier_src.rows GROUP BY chunk, org_id, project_id, hour)
  ANY LEFT JOIN (SELECT chunk, org_id, project_id, hour, sm, sv, um, uh FROM
    (SELECT chunk, org_id, project_id, hour, groupArray(m) AS sm, groupArray(v) AS sv FROM
      (SELECT chunk, org_id, project_id, hour, m, sum(x) AS v FROM exp_carrier_src.rows
       ARRAY JOIN meters AS m, meter_values AS x GROUP BY chunk, org_id, project_id, hour, m)
      GROUP BY chunk, org_id, project_id, hour)
    ANY LEFT JOIN (SELECT chunk, org_id, project_id, hour, groupArray(m) AS um, groupArray(h) AS uh FROM
      (SELECT DISTINCT chunk, org_id, project_id, hour, m, h FROM exp_carrier_src.rows
       ARRAY JOIN unique_meters AS m, unique_hashes AS h)
      GROUP BY chunk, org_id, project_id, hour) USING chunk, org_id, project_id, hour)
  USING chunk, org_id, project_id, hour""")
q(f"""CREATE TABLE exp_carrier_src.car ENGINE = Memory AS
  SELECT {COLS}, chunk, seq, if(is_carrier, sm, emptyArrayString()) AS c_sm,
         if(is_carrier, sv, emptyArrayUInt64()) AS c_sv, if(is_carrier, um, emptyArrayString()) AS c_um,
         if(is_carrier, uh, emptyArrayUInt64()) AS c_uh
  FROM (SELECT {COLS}, chunk, seq, seq = last AS is_carrier, sm, sv, um, uh FROM exp_carrier_src.rows
        ANY LEFT JOIN exp_carrier_src.groups USING chunk, org_id, project_id, hour)""")
print("carriers:", q("SELECT countIf(length(c_sm) > 0), sum(length(c_sm)), sum(length(c_um)) FROM exp_carrier_src.car").decode().strip(),
      "of", ROWS, "rows")

SEL = {
    "16": COLS,
    "21": COLS + ", if(length(c_sm) > 0, 2, 1), c_sm, c_sv, c_um, c_uh",
    "19": COLS + ", toInt32(length(c_sm)), arrayConcat(c_sm, c_um), arrayConcat(c_sv, c_uh)",
}
INS = {"16": COLS, "21": C21, "19": C19}
chunks = {k: [q(f"SELECT {sel} FROM exp_carrier_src.car WHERE chunk = {i} ORDER BY seq FORMAT RowBinary")
              for i in range(ROWS // BATCH)] for k, sel in SEL.items()}

targets = ["plain16", "views16", "plain21", "views21", "plain19", "views19"]
times = {t: [] for t in targets}
for rnd in range(3):
    for t in targets:
        db = f"exp_carrier_{t}"
        make(db, t)
        t0 = time.time()
        for c in chunks[t[-2:]]:
            q(f"INSERT INTO {db}.events ({INS[t[-2:]]}) FORMAT RowBinary", c)
        times[t].append(time.time() - t0)
for t, ts in times.items():
    print(f"{t:8} " + " ".join(f"{x:.2f}" for x in ts) + f"   best {min(ts):.2f} s   x plain16 {min(ts) / min(times['plain16']):.2f}")
totals = {t: q(f"SELECT sum(value), (SELECT uniqCombinedMerge(state) FROM exp_carrier_{t}.usage_unique_hourly), "
               f"(SELECT uniqCombinedMerge(state) FROM exp_carrier_{t}.usage_unique_daily) "
               f"FROM exp_carrier_{t}.usage_hourly_agg").decode().strip() for t in targets if t.startswith("views")}
print("totals (sum, unique hourly, unique daily):", totals)
assert len(set(totals.values())) == 1, "the layouts disagree"
for t in targets + ["src"]:
    q(f"DROP DATABASE IF EXISTS exp_carrier_{t}")
