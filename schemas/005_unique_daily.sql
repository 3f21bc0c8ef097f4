-- tally schema, part 5: unique-meter sketches per day, for reading long ranges (tally-api).
-- Fed from the narrow rows like the hourly sketches (ClickHouse 18.16 does not chain a view on
-- usage_unique_hourly), so a day's state holds exactly the hashes of that day's hourly states:
-- /v1/usage merges 31 states per project-month instead of 744 (docs/api.md, "Performance").
-- A daily state is larger than an hourly one (kilobytes once a day has thousands of users), and a
-- read deserialises whole granules: 32 rows per granule keeps a one-org read to its own states.
-- Days are UTC. The backfill merges the hourly states that exist when this file is applied; a
-- state merged twice (an insert racing the backfill) changes nothing: sketches are unions.
-- Runs on ClickHouse 18.16 and on current ClickHouse (checked on chDB in CI).

CREATE TABLE IF NOT EXISTS ${database}.usage_unique_daily
(
    org_id     String,
    project_id String,
    meter      String,
    day        DateTime,
    state      AggregateFunction(uniqCombined, UInt64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(day)
ORDER BY (org_id, project_id, meter, day)
SETTINGS index_granularity = 32;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_unique_daily_mv TO ${database}.usage_unique_daily AS
SELECT org_id, project_id, meter, toDateTime(intDiv(toUInt32(hour), 86400) * 86400) AS day, uniqCombinedState(h) AS state
FROM ${database}.events
ARRAY JOIN unique_meters AS meter, unique_hashes AS h
GROUP BY org_id, project_id, meter, day;

INSERT INTO ${database}.usage_unique_daily
SELECT org_id, project_id, meter, toDateTime(intDiv(toUInt32(hour), 86400) * 86400) AS day, uniqCombinedMergeState(state)
FROM ${database}.usage_unique_hourly
GROUP BY org_id, project_id, meter, day;
