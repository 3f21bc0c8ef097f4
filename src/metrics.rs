//! Every metric `tally-ingest` exports (§8), defined in one place. Label sets are bounded:
//! `outcome` (3 values), `reason` (9), `partition` (the topic's partitions), `op` (a few).

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};

use crate::reject::Reason;

pub const EVENTS: &str = "tally_events_total";
pub const MESSAGES: &str = "tally_messages_total";
pub const BATCHES: &str = "tally_batches_total";
pub const BATCH_EVENTS: &str = "tally_batch_events";
pub const CH_INSERT_SECONDS: &str = "tally_clickhouse_insert_seconds";
pub const STAGE_SECONDS: &str = "tally_batch_stage_seconds";
pub const EVENT_LATENCY: &str = "tally_event_to_aggregate_seconds";
pub const CH_ERRORS: &str = "tally_clickhouse_errors_total";
pub const DEDUPE_LOOKUPS: &str = "tally_dedupe_lookups_total";
pub const DEDUPE_KEYS: &str = "tally_dedupe_state_keys";
pub const DEDUPE_BYTES: &str = "tally_dedupe_state_bytes";
pub const DEDUPE_LOAD_SECONDS: &str = "tally_dedupe_load_seconds";
pub const CRED_CACHE_HITS: &str = "tally_credential_cache_hits_total";
pub const CRED_CACHE_MISSES: &str = "tally_credential_cache_misses_total";
pub const CRED_CACHE_HIT_RATIO: &str = "tally_credential_cache_hit_ratio";
pub const KEY_RELOADS: &str = "tally_key_reloads_total";
pub const DLQ_RECORDS: &str = "tally_dlq_records_total";
pub const DLQ_ERRORS: &str = "tally_dlq_errors_total";
pub const CONSUMER_LAG: &str = "tally_consumer_lag";
pub const COMMITTED_OFFSET: &str = "tally_committed_offset";
pub const UNSTABLE_MESSAGES: &str = "tally_consumer_unstable_messages";
pub const COMMITS: &str = "tally_commits_total";
pub const COMMIT_ERRORS: &str = "tally_commit_errors_total";
pub const REVOCATION_COMMITS: &str = "tally_revocation_commits_total";
pub const BROKER_ERRORS: &str = "tally_broker_errors_total";
pub const WAITING: &str = "tally_waiting";
pub const RETRY_SECONDS: &str = "tally_retry_wait_seconds_total";
pub const PARTITIONS: &str = "tally_partitions_assigned";
pub const REBALANCES: &str = "tally_rebalances_total";
pub const OFFSETS_SKIPPED: &str = "tally_offsets_skipped_total";
pub const OFFSET_GAPS: &str = "tally_offset_gaps_checked_total";
pub const OFFSET_GAPS_UNCHECKED: &str = "tally_offset_gaps_unchecked_total";
pub const STALLED: &str = "tally_stalled";
pub const MENDS: &str = "tally_aggregate_mends_total";
pub const MENDED: &str = "tally_aggregates_mended_total";
pub const OVER_LEDGER: &str = "tally_aggregates_over_ledger_total";

/// Registers descriptions (shown as `# HELP`).
pub fn describe() {
    describe_counter!(EVENTS, "Events by outcome: accepted, duplicate, rejected (with reason).");
    describe_counter!(MESSAGES, "Kafka messages consumed.");
    describe_counter!(BATCHES, "Batches written to ClickHouse and committed.");
    describe_histogram!(BATCH_EVENTS, "Events per batch.");
    describe_histogram!(CH_INSERT_SECONDS, Unit::Seconds, "Latency of a successful ClickHouse insert.");
    describe_histogram!(
        STAGE_SECONDS,
        Unit::Seconds,
        "Time per batch in each step of the loop (label stage=stage|lookup|encode|dlq_wait|insert_wait|commit; \
         insert_wait is how long landing a batch waited for its INSERT beyond the overlap)."
    );
    describe_histogram!(
        EVENT_LATENCY,
        Unit::Seconds,
        "Per message: from its Kafka timestamp (the producer's CreateTime) until the INSERT of its batch \
         returned, i.e. until its events count in the hourly aggregates."
    );
    describe_counter!(CH_ERRORS, "Failed ClickHouse requests, by op and class (transient|permanent).");
    describe_counter!(DEDUPE_LOOKUPS, "Event keys looked up in ClickHouse (the in-memory state could not decide).");
    describe_gauge!(DEDUPE_KEYS, "Keys in the dedupe filters of the assigned partitions.");
    describe_gauge!(DEDUPE_BYTES, Unit::Bytes, "Memory held by dedupe state.");
    describe_histogram!(DEDUPE_LOAD_SECONDS, Unit::Seconds, "Time to rebuild a partition's dedupe state.");
    describe_counter!(CRED_CACHE_HITS, "Credential verifications answered from the cache.");
    describe_counter!(CRED_CACHE_MISSES, "Credential verifications computed.");
    describe_gauge!(CRED_CACHE_HIT_RATIO, "Credential cache hits / lookups since start.");
    describe_counter!(KEY_RELOADS, "Key file reloads, by result.");
    describe_counter!(DLQ_RECORDS, "Records written to the dead-letter topic, by reason.");
    describe_counter!(DLQ_ERRORS, "Failed dead-letter writes (retried).");
    describe_gauge!(CONSUMER_LAG, "Messages behind the high watermark, per partition.");
    describe_gauge!(COMMITTED_OFFSET, "Last committed offset, per partition.");
    describe_gauge!(
        UNSTABLE_MESSAGES,
        "Offsets between the last stable offset and the high watermark, per partition: records (of every \
         producer) and markers held behind the oldest open transaction (read_committed), not counted in \
         tally_consumer_lag until it ends."
    );
    describe_counter!(COMMITS, "Offset commits.");
    describe_counter!(COMMIT_ERRORS, "Failed offset commits (the data is written; redelivery is deduplicated).");
    describe_counter!(
        REVOCATION_COMMITS,
        "Offset commits made by a revocation for a batch written but not landed yet (also counted in tally_commits_total)."
    );
    describe_counter!(BROKER_ERRORS, "Errors reported by the Kafka client.");
    describe_gauge!(
        WAITING,
        "1 while the worker waits for a dependency (label on=clickhouse|broker|identity_provider)."
    );
    describe_counter!(RETRY_SECONDS, "Seconds spent backing off, by dependency.");
    describe_gauge!(PARTITIONS, "Partitions currently assigned.");
    describe_counter!(REBALANCES, "Rebalance callbacks, by kind.");
    describe_counter!(
        OFFSETS_SKIPPED,
        "Offsets passed over without a record read, by partition and reason: deleted (records gone before the group \
         read them: retention passed the committed offset, or the position of a partition held; never billed), \
         rewound (the log is shorter than the committed offset or the position; read again) (src/source/start.rs, \
         src/source/gaps.rs)."
    );
    describe_counter!(
        OFFSET_GAPS,
        "Offsets of a held partition that no record was read for (transaction markers, compaction, deleted \
         records), between two records read or from the last record read to a quiet partition's consumer position, \
         checked against the partition's log start, by partition (src/source/gaps.rs)."
    );
    describe_counter!(
        OFFSET_GAPS_UNCHECKED,
        "Offsets between two records read from a held partition that no record was read for, not checked: the log \
         start was unknown (the broker's fetch responses carry none), by partition (src/source/gaps.rs); 1 per \
         assignment whose committed offset could not be read before its first commit, and the offsets a start check \
         passed over when the log start could not be had (src/source/start.rs)."
    );
    describe_counter!(
        crate::verify::jwks::JWKS_FETCHES,
        "Key set fetches from identity providers, by issuer and result (ok|error|rate_limited)."
    );
    describe_gauge!(
        crate::verify::jwks::JWKS_AGE,
        Unit::Seconds,
        "Seconds since an identity provider's key set was last fetched (the last good set serves meanwhile)."
    );
    describe_gauge!(crate::verify::jwks::JWKS_KEYS, "Keys in an identity provider's last fetched set.");
    describe_counter!(
        MENDS,
        "Checks of rows that may have landed without their aggregates (unconfirmed INSERTs), by when=retry|assigned."
    );
    describe_counter!(
        MENDED,
        "Additive hourly aggregates found short of the ledger (events) after an unconfirmed INSERT, and mended."
    );
    describe_counter!(
        OVER_LEDGER,
        "Additive hourly aggregates found above the ledger (never caused by a crash; left as they are, see \
         tally-invoicer verify)."
    );
    describe_gauge!(
        STALLED,
        "1 while a partition's batch cannot go through because of an error retrying does not fix \
         (reason=clickhouse_rejected|dead_letter_refused); nothing is skipped or committed past it."
    );
}

/// Sets `tally_stalled{partition,reason}`.
pub fn stalled(partition: i32, reason: &'static str, yes: bool) {
    gauge!(STALLED, "partition" => partition.to_string(), "reason" => reason).set(if yes { 1.0 } else { 0.0 });
}

pub fn accepted(n: u64) {
    counter!(EVENTS, "outcome" => "accepted").increment(n);
}

pub fn duplicates(n: u64) {
    counter!(EVENTS, "outcome" => "duplicate").increment(n);
}

pub fn rejected(reason: Reason) {
    counter!(EVENTS, "outcome" => "rejected", "reason" => reason.as_str()).increment(1);
}

pub fn waiting(on: &'static str, yes: bool) {
    gauge!(WAITING, "on" => on).set(if yes { 1.0 } else { 0.0 });
}

pub fn insert_latency(secs: f64, events: usize) {
    histogram!(CH_INSERT_SECONDS).record(secs);
    histogram!(BATCH_EVENTS).record(events as f64);
    counter!(BATCHES).increment(1);
}

/// Installs the Prometheus exporter on `listen` (its own thread and runtime).
pub fn install(listen: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let addr: std::net::SocketAddr = listen.parse().with_context(|| format!("invalid metrics.listen {listen:?}"))?;
    use metrics_exporter_prometheus::Matcher;
    // Histograms with explicit buckets (not summaries), so that p50/p99 can be aggregated
    // across replicas (`histogram_quantile` over `sum by (le)`).
    const SECONDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    const EVENTS_PER_BATCH: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 20_000.0, 50_000.0, 100_000.0];
    // Event-to-aggregate latency: finer around what a healthy loop achieves (a batch or two).
    const LATENCY: &[f64] =
        &[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0];
    // A `Full` matcher takes precedence over a `Suffix` one (the exporter sorts them).
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(EVENT_LATENCY.into()), LATENCY)
        .expect("valid buckets")
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .expect("valid buckets")
        .set_buckets_for_metric(Matcher::Full(BATCH_EVENTS.into()), EVENTS_PER_BATCH)
        .expect("valid buckets")
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("failed to serve metrics on {listen}"))?;
    describe();
    Ok(())
}
