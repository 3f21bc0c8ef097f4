-- tally schema, part 2: the invoicer's ledger of everything it sent to Stripe.
-- Append-only facts: a row with state 'intent' is written (and acknowledged by ClickHouse) before
-- the Stripe call, a row 'done' or 'failed' after it. Grouped by push_id, the rows say what was
-- pushed, what may have been pushed (intent only: resent with the same identifier and
-- Idempotency-Key on the next run) and what Stripe refused. See docs/invoicing.md.
-- Runs on ClickHouse 18.16 and on current ClickHouse (checked on chDB in CI).

CREATE TABLE IF NOT EXISTS ${database}.stripe_ledger
(
    push_id      String,
    state        String,
    action       String,
    mode         String,
    account      String,
    org_id       String,
    customer     String,
    meter        String,
    target       String,
    event_name   String,
    bucket_start DateTime,
    bucket_end   DateTime,
    seq          UInt32,
    value        UInt64,
    cancels      String,
    event_ts     DateTime,
    run_id       String,
    detail       String,
    recorded_at  DateTime
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(bucket_start)
ORDER BY (mode, customer, meter, bucket_start, push_id);
