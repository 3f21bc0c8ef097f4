-- tally schema, part 7: the views skip the rows their carriers count (issue 9; docs/measurements.md,
-- "The views skip counted rows"; docs/exactly-once.md, "Carrier rows").
-- Schema 006's views ARRAY JOIN-ed every inserted row: ClickHouse ran the `if`/`arraySlice`
-- expressions and replicated the key columns for all of them, though only carriers and
-- self-counted rows have entries. The same views now filter first: `WHERE` runs before the
-- `arrayJoin` function (an `ARRAY JOIN` clause would run before `WHERE`), so the expressions run
-- on carriers and self-counted rows only. What each view adds is unchanged, row kind by row kind:
--   agg_additive = -1 (self-counted)     kept by every filter; reads its own meters, as before
--   agg_additive = 0, empty arrays        dropped; it had no entries to add
--   agg_additive = n > 0 (carrier)        kept; n sums, then its pairs (if any), as before
--   agg_additive = 0, pairs only (carrier) kept by the unique views (notEmpty(agg_meters)); the
--                                        hourly sums view drops it, and it had no sums to add
-- (A `WHERE` in a subquery of the view's FROM would not do: ClickHouse 18.16 hands the view the
-- inserted block in place of the whole FROM, subquery included, so its filter is not applied.)
--
-- tally: stop-ingestion
-- Apply with ingestion STOPPED (`tally-ingest migrate --ingestion-stopped`), for the reason given in
-- 006: each view is dropped and created again, and an INSERT between the two would miss that view.
-- Workers of an older version may run after it (their rows and carriers are read as before).
-- Runs on ClickHouse 18.16 and on current ClickHouse (checked on chDB in CI).

DROP TABLE IF EXISTS ${database}.usage_hourly_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_hourly_mv TO ${database}.usage_hourly_agg AS
WITH arrayJoin(arrayMap((m, v) -> (m, v),
    if(agg_additive < 0, meters, arraySlice(agg_meters, 1, agg_additive)),
    if(agg_additive < 0, meter_values, arraySlice(agg_values, 1, agg_additive)))) AS entry
SELECT org_id, project_id, tupleElement(entry, 1) AS meter, hour, sum(tupleElement(entry, 2)) AS value
FROM ${database}.events
WHERE agg_additive != 0
GROUP BY org_id, project_id, meter, hour;

DROP TABLE IF EXISTS ${database}.usage_unique_hourly_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_unique_hourly_mv TO ${database}.usage_unique_hourly AS
WITH arrayJoin(arrayMap((m, h) -> (m, h),
    if(agg_additive < 0, unique_meters, arraySlice(agg_meters, agg_additive + 1)),
    if(agg_additive < 0, unique_hashes, arraySlice(agg_values, agg_additive + 1)))) AS entry
SELECT org_id, project_id, tupleElement(entry, 1) AS meter, hour, uniqCombinedState(tupleElement(entry, 2)) AS state
FROM ${database}.events
WHERE agg_additive < 0 OR notEmpty(agg_meters)
GROUP BY org_id, project_id, meter, hour;

DROP TABLE IF EXISTS ${database}.usage_unique_daily_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_unique_daily_mv TO ${database}.usage_unique_daily AS
WITH arrayJoin(arrayMap((m, h) -> (m, h),
    if(agg_additive < 0, unique_meters, arraySlice(agg_meters, agg_additive + 1)),
    if(agg_additive < 0, unique_hashes, arraySlice(agg_values, agg_additive + 1)))) AS entry
SELECT org_id, project_id, tupleElement(entry, 1) AS meter,
    toDateTime(intDiv(toUInt32(hour), 86400) * 86400) AS day, uniqCombinedState(tupleElement(entry, 2)) AS state
FROM ${database}.events
WHERE agg_additive < 0 OR notEmpty(agg_meters)
GROUP BY org_id, project_id, meter, day;
