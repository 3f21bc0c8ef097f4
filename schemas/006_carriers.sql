-- tally schema, part 6: carrier rows (issue 9; docs/exactly-once.md, "Carrier rows").
-- A worker sums each INSERT's rows per (org_id, project_id, hour) itself and puts the sums on the
-- group's last row, the carrier; the views add the carriers' entries instead of every event's
-- meters. agg_meters/agg_values hold the sums as (meter, value) entries, then the distinct unique
-- pairs as (meter, hash) entries; agg_additive says how many entries are sums. agg_additive = -1
-- (the default: rows written without carriers, by an older worker or a tool) makes the row count
-- itself from its own meters; 0 with empty arrays is a row counted by its group's carrier. The
-- per-event columns keep their meaning (the ledger, verify and the mend read them).
--
-- tally: stop-ingestion
-- Apply with ingestion STOPPED (`tally-ingest migrate --ingestion-stopped`; without the flag it
-- refuses on an existing database, and the invoicer leaves it pending): ClickHouse 18.16 has no
-- `ALTER … MODIFY QUERY`, so each view is dropped and created again, and an INSERT between the two
-- would miss that view. Committed offsets make the stop a pause, not a loss. Workers of an older
-- version may run after it: their rows count themselves.
-- 18.16 has no `ADD COLUMN IF NOT EXISTS`: `migrate` takes "column already exists" (code 44 on 18.16, 15 on current versions) on
-- an ADD COLUMN for done, so a run interrupted after one can be run again (one column each).
-- Runs on ClickHouse 18.16 and on current ClickHouse (checked on chDB in CI).

ALTER TABLE ${database}.events ADD COLUMN agg_additive Int32 DEFAULT -1;

ALTER TABLE ${database}.events ADD COLUMN agg_meters Array(String);

ALTER TABLE ${database}.events ADD COLUMN agg_values Array(UInt64);

DROP TABLE IF EXISTS ${database}.usage_hourly_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_hourly_mv TO ${database}.usage_hourly_agg AS
SELECT org_id, project_id, meter, hour, sum(v) AS value
FROM ${database}.events
ARRAY JOIN
    if(agg_additive < 0, meters, arraySlice(agg_meters, 1, agg_additive)) AS meter,
    if(agg_additive < 0, meter_values, arraySlice(agg_values, 1, agg_additive)) AS v
GROUP BY org_id, project_id, meter, hour;

DROP TABLE IF EXISTS ${database}.usage_unique_hourly_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_unique_hourly_mv TO ${database}.usage_unique_hourly AS
SELECT org_id, project_id, meter, hour, uniqCombinedState(h) AS state
FROM ${database}.events
ARRAY JOIN
    if(agg_additive < 0, unique_meters, arraySlice(agg_meters, agg_additive + 1)) AS meter,
    if(agg_additive < 0, unique_hashes, arraySlice(agg_values, agg_additive + 1)) AS h
GROUP BY org_id, project_id, meter, hour;

DROP TABLE IF EXISTS ${database}.usage_unique_daily_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_unique_daily_mv TO ${database}.usage_unique_daily AS
SELECT org_id, project_id, meter, toDateTime(intDiv(toUInt32(hour), 86400) * 86400) AS day, uniqCombinedState(h) AS state
FROM ${database}.events
ARRAY JOIN
    if(agg_additive < 0, unique_meters, arraySlice(agg_meters, agg_additive + 1)) AS meter,
    if(agg_additive < 0, unique_hashes, arraySlice(agg_values, agg_additive + 1)) AS h
GROUP BY org_id, project_id, meter, day;
