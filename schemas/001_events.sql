-- tally schema, part 1: the narrow per-event table and the hourly aggregates.
-- `${database}` is replaced by `clickhouse.database` when `tally-ingest migrate` applies this file.
-- Runs on ClickHouse 18.16 and on current ClickHouse (checked on chDB in CI).

CREATE DATABASE IF NOT EXISTS ${database};

-- One row per accepted event: no payload, no raw user id (unique meters keep only 64-bit hashes).
-- This table is the authority for deduplication (ORDER BY is the dedupe key) and the ledger that
-- any invoice line can be traced back to. ReplacingMergeTree makes an accidental second copy of an
-- event collapse at merge time and disappear under FINAL (see docs/exactly-once.md).
CREATE TABLE IF NOT EXISTS ${database}.events
(
    org_id        String,
    project_id    String,
    event_id      String,
    type          String,
    ts            DateTime,
    hour          DateTime,
    key_hash      UInt64,
    meters        Array(String),
    meter_values  Array(UInt64),
    unique_meters Array(String),
    unique_hashes Array(UInt64),
    src_topic     String,
    src_partition UInt32,
    src_offset    UInt64,
    batch_index   Int32,
    ingested_at   DateTime
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(hour)
ORDER BY (org_id, project_id, event_id);

-- Additive meters (count, sum), summed per hour.
CREATE TABLE IF NOT EXISTS ${database}.usage_hourly_agg
(
    org_id     String,
    project_id String,
    meter      String,
    hour       DateTime,
    value      UInt64
)
ENGINE = SummingMergeTree(value)
PARTITION BY toYYYYMM(hour)
ORDER BY (org_id, project_id, meter, hour);

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_hourly_mv TO ${database}.usage_hourly_agg AS
SELECT org_id, project_id, meter, hour, sum(v) AS value
FROM ${database}.events
ARRAY JOIN meters AS meter, meter_values AS v
GROUP BY org_id, project_id, meter, hour;

-- Unique meters: mergeable sketches (uniqCombined) of the 64-bit hashes, per hour.
-- A read deserialises every state of each granule it touches, so the granule is 256 rows, not
-- 8192: one org-month is 7,440 states, and a granule of 8,192 made a read of one project's or
-- one day's states pay for thousands of others (docs/api.md, "Performance").
CREATE TABLE IF NOT EXISTS ${database}.usage_unique_hourly
(
    org_id     String,
    project_id String,
    meter      String,
    hour       DateTime,
    state      AggregateFunction(uniqCombined, UInt64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(hour)
ORDER BY (org_id, project_id, meter, hour)
SETTINGS index_granularity = 256;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.usage_unique_hourly_mv TO ${database}.usage_unique_hourly AS
SELECT org_id, project_id, meter, hour, uniqCombinedState(h) AS state
FROM ${database}.events
ARRAY JOIN unique_meters AS meter, unique_hashes AS h
GROUP BY org_id, project_id, meter, hour;

-- The public read interface (PRODUCT.md §5): exact totals of additive meters per hour.
CREATE VIEW IF NOT EXISTS ${database}.usage_hourly AS
SELECT org_id, project_id, meter, hour, sum(value) AS value
FROM ${database}.usage_hourly_agg
GROUP BY org_id, project_id, meter, hour;
