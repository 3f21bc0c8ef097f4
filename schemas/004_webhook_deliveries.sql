-- tally schema, part 4: tally-api's webhook delivery log (PRODUCT.md §11, docs/api.md).
-- Append-only: one row per delivery attempt of a threshold notification, with its outcome
-- (`delivered`, `retrying`, `rejected` for a permanent 4xx, `gave_up` after the last attempt).
-- A notifier that takes over an org re-sends every notification of the current periods that has
-- no `delivered` (or final) row here, under the same `webhook-id`: receivers deduplicate on it.
-- Runs on ClickHouse 18.16 and on current ClickHouse (checked on chDB in CI).

CREATE TABLE IF NOT EXISTS ${database}.webhook_deliveries
(
    id          String,
    org_id      String,
    url         String,
    attempt     UInt32,
    status      UInt16,
    outcome     String,
    error       String,
    at          DateTime
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(at)
ORDER BY (id, attempt, at);
