"""Proves the ClickHouse schema and the documented read queries on the chDB engine it runs on
(in-process; scripts/check-chdb.sh runs it on ClickHouse 24.8 and on current ClickHouse), next to
the 18.16 server the integration tests use.

Applies schemas/*.sql as `tally-ingest migrate` does, inserts narrow rows (with a duplicate
that must collapse under FINAL), and checks usage_hourly, the unique-meter sketches and the
re-verification query documented in docs/clickhouse.md, and runs the invoicer's queries
(sql/invoicer/*.sql) and ledger table on the same data."""
import glob
import os
import re
import shutil
import sys
import tempfile

from chdb import session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DB = "tally"


def statements(sql):
    out, cur = [], []
    for line in sql.splitlines():
        if line.strip().startswith("--"):
            continue
        cur.append(line.rstrip())
        if line.rstrip().endswith(";"):
            stmt = "\n".join(cur).strip().rstrip(";").strip()
            if stmt:
                out.append(stmt)
            cur = []
    return out


def main():
    path = tempfile.mkdtemp(prefix="tally-chdb-")
    s = session.Session(path)
    q = lambda sql: str(s.query(sql, "TabSeparated")).strip()
    try:
        print("chDB engine", q("SELECT version()"))
        for f in sorted(glob.glob(os.path.join(ROOT, "schemas", "*.sql"))):
            for stmt in statements(open(f).read().replace("${database}", DB)):
                s.query(stmt)
            # Idempotent: a second application is a no-op (an `ADD COLUMN` whose column exists is
            # taken for done when its code is one of `COLUMN_EXISTS`, as `tally-ingest migrate`
            # does: 18.16 has no `IF NOT EXISTS` there).
            for stmt in statements(open(f).read().replace("${database}", DB)):
                try:
                    s.query(stmt)
                except Exception as e:
                    code = re.search(r"Code: (\d+)", str(e))
                    if not (stmt.startswith("ALTER TABLE") and "ADD COLUMN" in stmt and code
                            and int(code.group(1)) in column_exists()):
                        raise
        h = "toDateTime('2026-11-28 10:00:00', 'UTC')"
        rows = [
            ("o1", "p1", "e1", "generation-create", "['events','observations','input_tokens']", "[1,1,812]", "['unique_users']", "[11]"),
            ("o1", "p1", "e2", "trace-create", "['events','traces']", "[1,1]", "['unique_users']", "[12]"),
            ("o1", "p2", "e1", "score-create", "['events','scores']", "[1,1]", "[]", "[]"),
        ]
        for r in rows:
            s.query(
                f"INSERT INTO {DB}.events (org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, "
                f"unique_meters, unique_hashes, src_topic, src_partition, src_offset, batch_index, ingested_at) VALUES "
                f"('{r[0]}','{r[1]}','{r[2]}','{r[3]}',{h},{h},1,{r[4]},{r[5]},{r[6]},{r[7]},'t',0,0,-1,now())"
            )
        got = q(f"SELECT org_id, project_id, meter, toUnixTimestamp(hour), value FROM {DB}.usage_hourly ORDER BY 1,2,3")
        want = "\n".join([
            "o1\tp1\tevents\t1795860000\t2", "o1\tp1\tinput_tokens\t1795860000\t812",
            "o1\tp1\tobservations\t1795860000\t1", "o1\tp1\ttraces\t1795860000\t1",
            "o1\tp2\tevents\t1795860000\t1", "o1\tp2\tscores\t1795860000\t1",
        ])
        assert got == want, f"usage_hourly:\n{got}\nwant:\n{want}"
        types = q(f"SELECT name, type FROM system.columns WHERE database='{DB}' AND table='usage_hourly' ORDER BY position")
        assert types.split("\n") == ["org_id\tString", "project_id\tString", "meter\tString", "hour\tDateTime", "value\tUInt64"], types
        uniq = q(f"SELECT org_id, project_id, meter, uniqCombinedMerge(state) FROM {DB}.usage_unique_hourly GROUP BY org_id, project_id, meter")
        assert uniq == "o1\tp1\tunique_users\t2", uniq
        # A second copy of a narrow row (a defect the ingest path must never cause) collapses
        # under FINAL: the ledger stays the truth.
        r = rows[0]
        s.query(
            f"INSERT INTO {DB}.events (org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, "
            f"unique_meters, unique_hashes, src_topic, src_partition, src_offset, batch_index, ingested_at) VALUES "
            f"('{r[0]}','{r[1]}','{r[2]}','{r[3]}',{h},{h},1,{r[4]},{r[5]},{r[6]},{r[7]},'t',0,1,-1,now())"
        )
        # The ledger re-verification query (docs/clickhouse.md) agrees with the aggregates.
        ledger = q(f"SELECT meter, sum(v) FROM (SELECT meters, meter_values FROM {DB}.events FINAL) "
                   f"ARRAY JOIN meters AS meter, meter_values AS v GROUP BY meter ORDER BY meter")
        assert ledger.split("\n")[0] == "events\t3", ledger
        check_invoicer_queries(q, s, h)
        check_api_queries(q)
        check_mend_queries(q, s, h)
        check_carriers(q, s, h)
        if memory_tables_persist(q, s):
            check_move_settings(q, s)
            check_move_whole(q, s)
            check_fill_is_one_block(q, s)
        else:
            # Only chDB 2.x (engine 24.x) is known to: anywhere else the skip would hide the checks.
            assert q("SELECT version()").startswith("24."), "Memory tables lost between queries on a newer engine"
            print("this chDB starts its engine afresh for each query, so a Memory table is empty at the next one: "
                  "the staging-table checks (move order, whole move, one-block fill) run on the other engines only")
        print("schema OK on chDB: usage_hourly, unique sketches, ledger query, the invoicer's and tally-api's queries and carrier rows verified")
    finally:
        # chDB 2.x sessions have no close().
        getattr(s, "close", lambda: None)()
        shutil.rmtree(path, ignore_errors=True)


def move_settings():
    """The settings of the INSERT … SELECT that moves an attempt's rows into `events`, read from
    `MOVE_SETTINGS` in src/sink/mod.rs (one place for them)."""
    src = open(os.path.join(ROOT, "src", "sink", "mod.rs")).read()
    body = re.search(r"pub const MOVE_SETTINGS[^=]*=\s*\[(.*?)\];", src, re.S).group(1)
    pairs = re.findall(r'\("([a-z_]+)",\s*"([0-9.]+)"\)', body)
    assert len(pairs) == 3, pairs
    return ", ".join(f"{k} = {v}" for k, v in pairs)


def memory_tables_persist(q, s):
    """Whether a Memory table keeps its rows from one query of the session to the next: chDB 2.x
    (ClickHouse 24.8) starts its engine for each query, and a Memory table lives in the engine."""
    s.query(f"CREATE TABLE {DB}.memory_probe (n UInt8) ENGINE = Memory")
    s.query(f"INSERT INTO {DB}.memory_probe VALUES (1)")
    kept = q(f"SELECT count() FROM {DB}.memory_probe") == "1"
    s.query(f"DROP TABLE {DB}.memory_probe")
    return kept


def check_move_settings(q, s):
    """The move reads its staging table in one stream, in row order, with its own settings
    (docs/exactly-once.md, "Carrier rows", point 2): 32 blocks copied, each row numbered in the
    order the copy read it."""
    s.query(f"CREATE TABLE {DB}.probe_in (n UInt64) ENGINE = Memory")
    s.query(f"CREATE TABLE {DB}.probe_out (n UInt64, read UInt64) ENGINE = Memory")
    for i in range(32):
        s.query(f"INSERT INTO {DB}.probe_in SELECT number + {i * 1000} FROM system.numbers LIMIT 1000")
    assert q(f"SELECT uniqExact(blockNumber()) FROM {DB}.probe_in") == "32"
    s.query(f"INSERT INTO {DB}.probe_out SELECT n, rowNumberInAllBlocks() FROM {DB}.probe_in SETTINGS {move_settings()}")
    got = q(f"SELECT count(), countIf(n != read) FROM {DB}.probe_out")
    assert got == "32000\t0", f"the move read its staging table out of order: {got}"


def column_exists():
    """`COLUMN_EXISTS` of src/sink/schema.rs: the codes `migrate` takes for "column already exists"."""
    src = open(os.path.join(ROOT, "src", "sink", "schema.rs")).read()
    body = re.search(r"pub const COLUMN_EXISTS: \[u32; \d+\] = \[([0-9, ]+)\];", src).group(1)
    return [int(c) for c in body.split(",")]


def fill_row_settings():
    """`FILL_ROW_SETTINGS` of src/sink/mod.rs: the settings of a staging table's fill, each set to
    the attempt's row count."""
    src = open(os.path.join(ROOT, "src", "sink", "mod.rs")).read()
    body = re.search(r"pub const FILL_ROW_SETTINGS[^=]*=\s*\[(.*?)\];", src, re.S).group(1)
    names = re.findall(r'"([a-z_]+)"', body)
    assert names, body
    return names


def check_fill_is_one_block(q, s):
    """A staging table is filled as one block whatever the server's defaults (docs/exactly-once.md,
    "Carrier rows", point 1): current ClickHouse cuts a row-input block once
    `min_insert_block_size_rows` and `_bytes` are both reached (checked each `max_block_size` rows
    parsed). Here those defaults are 1,000 rows and 10,000 bytes, and 200,000 rows were cut in
    blocks of ~66,000 with `max_insert_block_size` alone; the worker's fill settings (each at the
    row count) keep them in one block. TSV with parallel parsing off stands in for RowBinary,
    which is parsed in one stream."""
    s.query(f"CREATE TABLE {DB}.fill_probe (n UInt64, pad String) ENGINE = Memory")
    rows = 200000
    data = "\n".join(f"{i}\t{'x' * 16}" for i in range(rows))
    defaults = "min_insert_block_size_rows = 1000, min_insert_block_size_bytes = 10000, input_format_parallel_parsing = 0"
    blocks = lambda: q(f"SELECT uniqExact(blockNumber()), count() FROM {DB}.fill_probe SETTINGS max_threads = 1")
    # With `max_insert_block_size` alone at the row count (as the worker filled until 2026-12-01).
    s.query(f"INSERT INTO {DB}.fill_probe SETTINGS {defaults}, max_insert_block_size = {rows} FORMAT TSV\n{data}")
    assert blocks() != f"1\t{rows}", "the probe's defaults no longer cut blocks: the check below proves nothing"
    s.query(f"TRUNCATE TABLE {DB}.fill_probe")
    fill = ", ".join(f"{name} = {rows}" for name in fill_row_settings())
    s.query(f"INSERT INTO {DB}.fill_probe SETTINGS {defaults}, {fill} FORMAT TSV\n{data}")
    assert blocks() == f"1\t{rows}", f"the staging fill was cut into blocks: {blocks()}"


def move_whole(table, columns, stage, count):
    """The move out of a staging table as `move_whole` in src/sink/mod.rs writes it (its format
    string, read from the source: one place for it)."""
    src = open(os.path.join(ROOT, "src", "sink", "mod.rs")).read()
    body = re.search(r"fn move_whole\([^)]*\) -> String \{\s*format!\(\s*\"(.*?)\"\s*\)", src, re.S).group(1)
    sql = re.sub(r"\\\n\s*", "", body)
    return sql.format(table=table, columns=columns, stage=stage, count=count)


def check_move_whole(q, s):
    """The move copies a staging table only while it holds every row sent: an emptied one (a
    server restart empties Memory tables) or one short of rows fails with code 395 and copies
    nothing. (A `throwIf` over the copied rows is never called on current ClickHouse when there is
    none: the empty case moved nothing and succeeded.)"""
    s.query(f"CREATE TABLE {DB}.move_in (n UInt64) ENGINE = Memory")
    s.query(f"CREATE TABLE {DB}.move_out (n UInt64) ENGINE = Memory")
    for count, rows in [(5, 0), (5, 4), (5, 5)]:
        s.query(f"TRUNCATE TABLE {DB}.move_in")
        if rows:
            s.query(f"INSERT INTO {DB}.move_in SELECT number FROM system.numbers LIMIT {rows}")
        sql = move_whole(f"{DB}.move_out", "n", f"{DB}.move_in", count)
        try:
            s.query(sql)
            failed = None
        except Exception as e:
            failed = str(e)
        if rows == count:
            assert failed is None, failed
        else:
            assert failed is not None and "395" in failed, f"the move of {rows} of {count} rows: {failed or 'succeeded'}"
    assert q(f"SELECT count() FROM {DB}.move_out") == "5", "only the whole staging table was moved"


def check_carriers(q, s, h):
    """Carrier rows (schemas/006_carriers.sql, the views' filters of 007_carrier_filters.sql,
    src/sink/carrier.rs): a row with agg_additive 0 and
    empty arrays counts nothing, a carrier counts its entries (the first agg_additive as sums, the
    rest as unique pairs), and a row written without carriers (-1, the default) counts its own
    meters, in the hourly sums and in the hourly and daily sketches. (The carrier's entries differ
    from its group's meters here on purpose, so that the check tells which one the views read.)"""
    cols = ("org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, unique_meters, "
            "unique_hashes, src_topic, src_partition, src_offset, batch_index, ingested_at, "
            "agg_additive, agg_meters, agg_values")
    rows = [
        ("c1", "['events','input_tokens']", "[1,5]", "['unique_users']", "[7]", 0, "[]", "[]"),
        ("c2", "['events','input_tokens']", "[1,6]", "['unique_users']", "[8]", 0, "[]", "[]"),
        ("c3", "['events','input_tokens']", "[1,7]", "['unique_users']", "[7]", 2,
         "['events','input_tokens','unique_users','unique_users','unique_users']", "[30,180,7,8,10]"),
    ]
    values = ",".join(
        f"('oc','pc','{r[0]}','generation-create',{h},{h},1,{r[1]},{r[2]},{r[3]},{r[4]},'t',0,0,-1,now(),"
        f"{r[5]},{r[6]},{r[7]})" for r in rows)
    s.query(f"INSERT INTO {DB}.events ({cols}) VALUES {values}")
    # A row of an older writer: no carrier columns at all.
    s.query(f"INSERT INTO {DB}.events (org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, "
            f"unique_meters, unique_hashes, src_topic, src_partition, src_offset, batch_index, ingested_at) VALUES "
            f"('oc','pc','c4','trace-create',{h},{h},1,['events'],[1],['unique_users'],[9],'t',0,0,-1,now())")
    # Carriers with sums only (project pd) and with unique pairs only (pe).
    s.query(f"INSERT INTO {DB}.events ({cols}) VALUES "
            f"('oc','pd','d1','trace-create',{h},{h},1,['events'],[1],[],[],'t',0,0,-1,now(),2,['events','input_tokens'],[5,50]),"
            f"('oc','pe','e1','trace-create',{h},{h},1,['events'],[1],['unique_users'],[21],'t',0,0,-1,now(),0,['unique_users','unique_users'],[21,22])")
    got = q(f"SELECT project_id, meter, sum(value) FROM {DB}.usage_hourly_agg WHERE org_id = 'oc' "
            f"GROUP BY project_id, meter ORDER BY project_id, meter")
    assert got == "pc\tevents\t31\npc\tinput_tokens\t180\npd\tevents\t5\npd\tinput_tokens\t50", f"carrier sums:\n{got}"
    for t in ("usage_unique_hourly", "usage_unique_daily"):
        uniq = q(f"SELECT project_id, uniqCombinedMerge(state) FROM {DB}.{t} WHERE org_id = 'oc' "
                 f"GROUP BY project_id ORDER BY project_id")
        assert uniq == "pc\t4\npe\t2", f"{t}: {uniq}"


def render(name, variables, folder="invoicer"):
    """sql/FOLDER/NAME.sql with ${var} placeholders filled, as src/invoice/sql.rs does."""
    sql = "\n".join(l for l in open(os.path.join(ROOT, "sql", folder, name + ".sql")).read().splitlines()
                    if not l.strip().startswith("--"))
    for k, v in variables.items():
        sql = sql.replace("${" + k + "}", str(v))
    assert "${" not in sql, sql
    return sql


# Window start expressions of `GET /v1/usage`, as src/api/usage.rs (`Window::sql`) writes them.
API_WINDOWS = {
    "hour": "toUInt32(hour)",
    "day": "intDiv(toUInt32(hour), 86400) * 86400",
    "month": "toUInt32(toDateTime(toStartOfMonth(hour, 'UTC'), 'UTC'))",
    "none": "toUInt32(0)",
}


def check_api_queries(q):
    """tally-api's usage queries (sql/api/*.sql) on current ClickHouse, on the data above (o1 has
    one duplicated narrow row, which the aggregates count twice)."""
    hour = 1795860000  # 2026-11-28T10:00:00Z
    rows = lambda sql: [l.split("\t") for l in q(sql).splitlines() if l]
    v = {"database": DB, "from": hour - 86400, "to": hour + 86400}
    day0 = hour - hour % 86400
    got = lambda name, project, window, filters, days=(day0, day0 + 86400): rows(render(name, {
        **v, "project": project, "window": API_WINDOWS[window], "filters": filters,
        "day_from": days[0], "day_to": days[1]}, folder="api"))
    month = got("usage_additive", "''", "month", "AND org_id = 'o1' AND meter IN ('events', 'scores')")
    assert month == [["o1", "", "events", "1793491200", "0", "4"], ["o1", "", "scores", "1793491200", "0", "1"]], month
    day = got("usage_additive", "project_id", "day", "AND org_id = 'o1' AND meter IN ('scores')")
    assert day == [["o1", "p2", "scores", str(hour - hour % 86400), "0", "1"]], day
    assert got("usage_additive", "''", "hour", "AND meter IN ('events')")[0][3] == str(hour)
    # Unique meters: the same count from the daily sketches (the whole day), from the hourly
    # ones (no whole day), and from both (a whole day plus hours around it).
    for days in [(day0, day0 + 86400), (v["from"], v["from"]), (day0 + 86400, day0 + 86400)]:
        uniq = got("usage_unique", "''", "none", "AND meter IN ('unique_users')", days)
        assert uniq == [["o1", "", "unique_users", "0", "0", "2"]], (days, uniq)
    daily = q(f"SELECT org_id, project_id, toUInt32(day), uniqCombinedMerge(state) FROM {DB}.usage_unique_daily GROUP BY org_id, project_id, day")
    assert daily == f"o1\tp1\t{day0}\t2", daily


def check_mend_queries(q, s, h):
    """tally-ingest's mend of rows that landed without their views (sql/ingest/mend_*.sql, run as
    src/sink/mend.rs runs them): two rows of partition 3 written with the views detached."""
    rows = lambda sql: [l.split("\t") for l in q(sql).splitlines() if l]
    views = ("usage_hourly_mv", "usage_unique_hourly_mv", "usage_unique_daily_mv")
    for v in views:
        # PERMANENTLY: chDB 2.x (ClickHouse 24.8) starts its engine afresh for each query of a
        # session, which re-attaches a table detached for the engine's life only.
        s.query(f"DETACH TABLE {DB}.{v} PERMANENTLY")
    s.query(
        f"INSERT INTO {DB}.events (org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, "
        f"unique_meters, unique_hashes, src_topic, src_partition, src_offset, batch_index, ingested_at) VALUES "
        + ",".join(f"('m1', 'mp', 'e{i}', 'trace-create', {h}, {h}, {i}, ['events','traces'], [1,1], ['unique_users'], "
                   f"[{100 + i}], 'tm', 3, {10 + i}, -1, now())" for i in range(2))
    )
    for v in views:
        s.query(f"ATTACH TABLE {DB}.{v}")
    hour = 1795860000
    v = {"database": DB, "topic": "'tm'", "partition": 3, "from_offset": 10, "to_offset": 2**63 - 1,
         "horizon_hour": hour - 86400}
    touched = render("mend_touched", v, folder="ingest")
    assert q(f"SELECT count() FROM ({touched})") == "2"
    assert q(f"SELECT count() FROM ({render('mend_touched', {**v, 'from_offset': 12}, folder='ingest')})") == "0"
    s.query(render("mend_unique_hourly", v, folder="ingest"))
    s.query(render("mend_unique_daily", v, folder="ingest"))
    short = sorted(rows(render("mend_additive", {**v, "touched": touched}, folder="ingest")))
    assert short == [["m1", "mp", "events", str(hour), "2", "0"], ["m1", "mp", "traces", str(hour), "2", "0"]], short
    s.query(f"INSERT INTO {DB}.usage_hourly_agg VALUES ('m1', 'mp', 'events', {hour}, 2), ('m1', 'mp', 'traces', {hour}, 2)")
    assert rows(render("mend_additive", {**v, "touched": touched}, folder="ingest")) == []
    # A second mend of the sketches changes nothing (a union).
    s.query(render("mend_unique_hourly", v, folder="ingest"))
    for t in ("usage_unique_hourly", "usage_unique_daily"):
        got = q(f"SELECT uniqCombinedMerge(state) FROM {DB}.{t} WHERE org_id = 'm1'")
        assert got == "2", (t, got)


def check_invoicer_queries(q, s, h):
    """The invoicer's queries on current ClickHouse. The data holds one duplicate narrow row
    (inserted above): the aggregates count it twice, the events under FINAL once, so `verify`
    must report exactly the three meters of that event and nothing else."""
    hour = 1795860000
    v = {"database": DB, "from": hour - 86400, "to": hour + 86400}
    rows = lambda sql: [l.split("\t") for l in q(sql).splitlines() if l]
    # Sums come as (value_hi, value_lo) 32-bit halves, joined exactly as src/invoice/sql.rs does.
    fig = lambda name: {tuple(r[:4]): (int(r[4]) << 32) + int(r[5]) for r in rows(render(name, v))}
    agg, ev = {**fig("verify_aggregates_additive"), **fig("verify_aggregates_unique")}, fig("verify_events")
    diff = sorted(k for k in set(agg) | set(ev) if agg.get(k) != ev.get(k))
    want = [("o1", "p1", m, str(hour)) for m in ("events", "input_tokens", "observations")]
    assert diff == want, f"verify mismatches {diff}, want {want}"
    assert agg[("o1", "p1", "unique_users", str(hour))] == ev[("o1", "p1", "unique_users", str(hour))] == 2
    # The daily sketches against the events, whole days: the duplicate row changes no distinct count.
    day0 = hour - hour % 86400
    daily = rows(render("verify_daily_sketches", {**v, "day_from": day0 - 86400, "day_to": day0 + 2 * 86400}))
    assert sorted(daily) == [["events", "o1", "p1", "unique_users", str(day0), "2"],
                             ["sketch", "o1", "p1", "unique_users", str(day0), "2"]], daily
    assert rows(render("unique_period", v)) == [["o1", "unique_users", "2"]]
    usage = rows(render("usage_additive", {**v, "org_filter": "AND org_id = 'o1'"}))
    assert ["o1", "p2", "scores", "0", "1"] in usage, usage
    assert rows(render("usage_unique", {**v, "org_filter": ""})) == [["o1", "p1", "unique_users", "0", "2"]]
    # A total beyond 64 bits: `sum` wraps to 0, the split sums keep it exactly (2^64).
    s.query(
        f"INSERT INTO {DB}.events (org_id, project_id, event_id, type, ts, hour, key_hash, meters, meter_values, "
        f"unique_meters, unique_hashes, src_topic, src_partition, src_offset, batch_index, ingested_at) VALUES "
        + ",".join(
            f"('o9', 'p9', 'big{i}', 'generation-create', toDateTime({hour}), toDateTime({hour}), {i}, ['input_tokens'], "
            f"[9223372036854775808], [], [], 't', 0, {i}, -1, now())"
            for i in range(2)
        )
    )
    big = [r for r in rows(render("verify_events", v)) if r[0] == "o9"]
    assert big == [["o9", "p9", "input_tokens", str(hour), "4294967296", "0"]], big
    wrapped = q(f"SELECT sum(v) FROM {DB}.events ARRAY JOIN meter_values AS v WHERE org_id = 'o9'")
    assert wrapped.strip() == "0", wrapped
    over = rows(render("overflow_hours", {**v, "org_filter": ""}))
    assert over == [["o9", "p9", "input_tokens", str(hour), "4294967296", "0"]], over
    s.query(
        f"INSERT INTO {DB}.stripe_ledger (push_id, state, action, mode, account, org_id, customer, meter, target, "
        f"event_name, bucket_start, bucket_end, seq, value, cancels, event_ts, run_id, detail, recorded_at) VALUES "
        f"('tally_x', 'intent', 'push', 'meters', '', 'o1', 'cus_1', 'events', 'mtr_1', 'tally_events', "
        f"toDateTime({hour}), toDateTime({hour + 3600}), 1, 3, '', toDateTime({hour}), 'r', '', now())"
    )
    ledger = rows(render("ledger_read", {**v, "mode": "'meters'", "account": "''"}))
    assert len(ledger) == 1 and ledger[0][0] == "tally_x" and ledger[0][8] == str(hour) and ledger[0][11] == "3", ledger
    assert ledger[0][16] == "r", ledger
    # `explain`: per project and bucket (the duplicate narrow row counts twice in the aggregates,
    # which `verify` reports), and the events of one hour paged in key order (FINAL: once each).
    ex = {"meter": "'events'", "orgs": "'o1'", "bucket_secs": 3600}
    got = rows(render("explain_projects", {**v, **ex}))
    assert got == [["o1", "p1", str(hour), "0", "3"], ["o1", "p2", str(hour), "0", "1"]], got
    got = rows(render("explain_projects_unique", {**v, **ex, "meter": "'unique_users'"}))
    assert got == [["o1", "p1", "2"]], got
    page = lambda after, limit: rows(render("explain_events", {
        "database": DB, "arrays": "meters AS m, meter_values AS v", "meter": "'events'", "orgs": "'o1'",
        "hour": hour, "project_filter": "", "after_org": f"'{after[0]}'", "after_project": f"'{after[1]}'",
        "after_event": f"'{after[2]}'", "limit": limit}))
    first = page(("", "", ""), 2)
    assert [r[:3] for r in first] == [["o1", "p1", "e1"], ["o1", "p1", "e2"]] and first[0][5] == "1", first
    rest = page(tuple(first[-1][:3]), 2)
    assert [r[:3] for r in rest] == [["o1", "p2", "e1"]], rest


if __name__ == "__main__":
    sys.exit(main())
