//! `complete_until` and `final_until` (PRODUCT.md §11), from the ingest group's committed offsets.
//!
//! A worker commits a partition's offset only after ClickHouse acknowledged the rows of every
//! message before it (docs/exactly-once.md), and the aggregates are written by the same INSERT.
//! So for each partition of the source topic, every message before the committed offset is
//! counted, and the first message not yet counted is the one *at* the committed offset. Its
//! Kafka timestamp bounds what is complete:
//!
//! * partition with a message at its committed offset `c`: complete until that message's
//!   timestamp (floored to the second);
//! * partition with none (the group is caught up there): complete until the time the check
//!   started — a message appended later carries a later log-append time;
//! * `complete_until` is the least of these over all partitions.
//!
//! This is exact for topics with `message.timestamp.type=LogAppendTime`. With `CreateTime` (the
//! Kafka default) the bound is the producers' clocks: a producer may still send a message stamped
//! earlier than a pending one's (docs/api.md says so).
//!
//! `final_until`: an event is accepted while its time is within `dedupe.window_secs` of its
//! message's timestamp (PRODUCT.md §3 `too_old`), so an hour can still change until every
//! message that could carry it is counted: hours ending at or before
//! `complete_until − window_secs` are final.
//!
//! The check runs on a background thread every `api.progress_refresh_ms`; requests read the last
//! result (an older result only understates what is complete). A check that fails (broker down)
//! keeps the last result and is counted (`tally_api_progress_errors_total`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::source::worker::now_secs;

/// The last completed check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Unix seconds: every message with a Kafka timestamp before it is counted.
    pub complete_until: i64,
    /// When the check started (Unix seconds).
    pub checked_at: i64,
}

/// Shared view of the last check.
#[derive(Clone, Default)]
pub struct Progress {
    last: Arc<Mutex<Option<Snapshot>>>,
}

impl Progress {
    /// The last check's result (`None` until one succeeded).
    pub fn get(&self) -> Option<Snapshot> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set(&self, s: Snapshot) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
    }

    /// Starts the background check of `cfg.topic` for `cfg.group_id`, every `every`.
    pub fn spawn(cfg: &KafkaConfig, every: Duration) -> Result<Progress, KafkaError> {
        let mut probe = Probe::new(cfg)?;
        let progress = Progress::default();
        let out = progress.clone();
        std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || loop {
                let started = Instant::now();
                match probe.check(every.max(Duration::from_secs(2)) * 2) {
                    Ok(s) => {
                        out.set(s);
                        metrics::gauge!("tally_api_complete_until_seconds").set(s.complete_until as f64);
                    }
                    Err(e) => {
                        metrics::counter!("tally_api_progress_errors_total").increment(1);
                        tracing::warn!(error = %e, "complete_until: the ingest group's progress could not be read");
                    }
                }
                std::thread::sleep(every.saturating_sub(started.elapsed()));
            })
            .expect("spawn the progress thread");
        Ok(progress)
    }
}

/// Hours ending at or before `complete_until − window_secs` no longer change.
pub fn final_until(complete_until: i64, window_secs: i64) -> i64 {
    let t = complete_until.saturating_sub(window_secs);
    t - t.rem_euclid(3600)
}

/// Reads committed offsets of the ingest group and the message at each.
struct Probe {
    topic: String,
    /// Configured with the ingest group's id, only to read its committed offsets: it never
    /// subscribes, so it never joins the group.
    group: BaseConsumer,
    /// Assigned by hand at the committed offsets (its own group id; it commits nothing).
    reader: BaseConsumer<ReaderContext>,
}

/// The reader's client context: the end of a partition is an answer of the check, not an error
/// (librdkafka also reports it as a client error, which rdkafka's default context logs at ERROR
/// level, once per partition and check); other client errors are logged as warnings.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode;
        if !matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF) | KafkaError::PartitionEOF(_)) {
            tracing::warn!(error = %error, reason, "kafka client error (progress reader)");
        }
    }
}

impl ConsumerContext for ReaderContext {}

impl Probe {
    fn new(cfg: &KafkaConfig) -> Result<Probe, KafkaError> {
        let mut g = crate::source::consumer_config(cfg);
        g.set("client.id", "tally-api").set("statistics.interval.ms", "0");
        let mut r = crate::source::consumer_config(cfg);
        r.set("client.id", "tally-api")
            .set("statistics.interval.ms", "0")
            .set("group.id", format!("{}.tally-api-progress", cfg.group_id))
            .set("enable.partition.eof", "true")
            .set("max.partition.fetch.bytes", "1")
            .set("fetch.wait.max.ms", "10");
        Ok(Probe { topic: cfg.topic.clone(), group: g.create()?, reader: r.create_with_context(ReaderContext)? })
    }

    fn check(&mut self, timeout: Duration) -> Result<Snapshot, KafkaError> {
        let started = now_secs();
        let deadline = Instant::now() + timeout;
        let md = self.group.fetch_metadata(Some(&self.topic), timeout)?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition));
        }
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(&self.topic, *p);
        }
        let committed = self.group.committed_offsets(tpl, timeout)?;
        let mut at = TopicPartitionList::new();
        for e in committed.elements() {
            // No commit yet: the group starts at the beginning (`auto.offset.reset=earliest`).
            let offset = match e.offset() {
                Offset::Offset(n) => Offset::Offset(n),
                _ => Offset::Beginning,
            };
            at.add_partition_offset(&self.topic, e.partition(), offset)?;
        }
        self.reader.assign(&at)?;
        let mut pending: std::collections::BTreeSet<i32> = partitions.iter().copied().collect();
        let mut complete = started;
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KafkaError::MessageConsumption(rdkafka::types::RDKafkaErrorCode::RequestTimedOut));
            }
            match self.reader.poll(left.min(Duration::from_millis(200))) {
                None => {}
                Some(Ok(m)) if pending.remove(&m.partition()) => {
                    let ts_ms = m.timestamp().to_millis().unwrap_or(0);
                    complete = complete.min(ts_ms.div_euclid(1000));
                }
                Some(Ok(_)) => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    pending.remove(&p);
                }
                Some(Err(e)) => return Err(e),
            }
        }
        self.reader.unassign()?;
        Ok(Snapshot { complete_until: complete, checked_at: started })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_hours_are_a_window_behind() {
        let hour = crate::timestamp::parse_rfc3339("2026-11-29T10:00:00Z").unwrap();
        // complete until 10:20, 30-day window → final until 2026-10-30T10:00:00Z.
        assert_eq!(final_until(hour + 20 * 60, 30 * 86_400), hour - 30 * 86_400);
        assert_eq!(final_until(hour + 20 * 60, 0), hour);
    }
}
