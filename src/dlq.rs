//! The dead-letter topic (§3): every unbillable message or batch event, with its original key,
//! value and headers plus `tally-reject-reason`, `tally-source-topic`, `tally-source-partition`,
//! `tally-source-offset` (and `tally-batch-index` for one event of a batch).
//!
//! Writes are acknowledged (`acks=all`) before the source offset is committed. A record may be
//! written twice if the worker dies between the write and the commit; the source coordinates
//! (topic, partition, offset, batch index) identify it, and readers of the topic dedupe on them.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{BorrowedHeaders, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::reject::Reason;

pub const H_REASON: &str = "tally-reject-reason";
pub const H_TOPIC: &str = "tally-source-topic";
pub const H_PARTITION: &str = "tally-source-partition";
pub const H_OFFSET: &str = "tally-source-offset";
pub const H_BATCH_INDEX: &str = "tally-batch-index";

/// One record to dead-letter.
pub struct DlqRecord<'a> {
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    /// The original message's headers, copied whole as they were (names need not be UTF-8).
    pub headers: Option<&'a BorrowedHeaders>,
    pub reason: Reason,
    pub partition: i32,
    pub offset: i64,
    pub batch_index: Option<u32>,
}

/// A dead-letter write that failed, and whether retrying it can help.
#[derive(Debug, Clone)]
pub struct Failure {
    pub error: String,
    /// The broker refuses this record as it is (too large, topic missing or not allowed): the
    /// same write fails until the topic or the broker's settings change.
    pub permanent: bool,
}

impl Failure {
    fn of(e: &rdkafka::error::KafkaError) -> Self {
        Failure { error: e.to_string(), permanent: e.rdkafka_error_code().is_some_and(is_permanent) }
    }
}

/// Broker and client error codes that no retry of the same record can fix.
pub fn is_permanent(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidRecord
            | C::InvalidMessage
            | C::UnknownTopic
            | C::UnknownTopicOrPartition
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::InvalidRequiredAcks
            | C::PolicyViolation
            | C::UnsupportedCompressionType
    )
}

/// Delivery bookkeeping: which records are still unacknowledged, which failed.
#[derive(Default)]
struct Ctx {
    state: Mutex<Deliveries>,
}

/// The records of the current *round* (the `enqueue`s since the last [`DeadLetters::wait_acks`]
/// returned), by index in the caller's records. Each record's delivery report carries its round:
/// a report of a closed round (a record purged at a timeout, reported after `wait_acks` gave up
/// on it) is ignored, so it can never stand for the record of the same index in a later round,
/// the next batch's or a retry's, and have it taken as acknowledged.
#[derive(Default)]
struct Deliveries {
    round: u64,
    outstanding: std::collections::HashSet<usize>,
    failed: Vec<(usize, Failure)>,
}

impl Deliveries {
    /// A delivery report: record `index` of `round`, and its failure if it failed.
    fn report(&mut self, round: u64, index: usize, failure: Option<Failure>) {
        if round != self.round {
            return;
        }
        self.outstanding.remove(&index);
        if let Some(f) = failure {
            self.failed.push((index, f));
        }
    }

    /// Whether `round` is the open round and all its records are acknowledged, none failed.
    fn acknowledged(&self, round: u64) -> bool {
        self.round == round && self.outstanding.is_empty() && self.failed.is_empty()
    }

    /// Ends the round: its failures (purged records included), and later reports of its records
    /// are ignored.
    fn close(&mut self) -> Vec<(usize, Failure)> {
        self.round += 1;
        self.outstanding.clear();
        std::mem::take(&mut self.failed)
    }
}

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    /// (round, index) of the record, see [`Deliveries`].
    type DeliveryOpaque = Box<(u64, usize)>;
    fn delivery(&self, result: &DeliveryResult<'_>, tag: Box<(u64, usize)>) {
        let (round, index) = *tag;
        let failure = result.as_ref().err().map(|(e, _)| Failure::of(e));
        self.state.lock().expect("lock").report(round, index, failure);
    }
}

pub struct DeadLetters {
    producer: BaseProducer<Ctx>,
    topic: String,
    source_topic: String,
}

impl DeadLetters {
    pub fn new(base: &ClientConfig, topic: &str, source_topic: &str) -> anyhow::Result<Self> {
        let mut cfg = base.clone();
        // A rejected message is as large as the source topic allowed (`too_large` ones exceed
        // `ingest.max_message_bytes`, not the broker's limit): let the broker be the judge. The
        // broker's limit applies to the compressed batch, and the source message may have come
        // compressed (a `too_large` value of 50 MB of repeats in a 1 MB record): dead letters are
        // compressed too, with lz4 unless `kafka.options` names a codec. lz4 is the cheapest of
        // the four to write, and librdkafka decompresses it without the `receive.message.max.bytes`
        // cap it puts on zstd, so a reader with default settings can read a large dead letter.
        if cfg.get("compression.type").is_none() {
            cfg.set("compression.type", "lz4");
        }
        cfg.set("acks", "all")
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "5")
            .set("message.max.bytes", "1000000000");
        let producer = cfg.create_with_context(Ctx::default())?;
        Ok(DeadLetters { producer, topic: topic.to_string(), source_topic: source_topic.to_string() })
    }

    /// Queues `records[i]` for each `i` in `which` without waiting; [`DeadLetters::wait_acks`]
    /// waits for them. Records that could not even be queued are returned as failed.
    pub fn enqueue(&self, records: &[DlqRecord<'_>], which: &[usize]) -> Vec<(usize, Failure)> {
        let mut failed = Vec::new();
        let round = self.producer.context().state.lock().expect("lock").round;
        for &i in which {
            let r = &records[i];
            let (partition, offset) = (r.partition.to_string(), r.offset.to_string());
            let index = r.batch_index.map(|b| b.to_string());
            let mut headers = r.headers.map_or_else(|| OwnedHeaders::new_with_capacity(5), BorrowedHeaders::detach);
            headers = headers
                .insert(Header { key: H_REASON, value: Some(r.reason.as_str()) })
                .insert(Header { key: H_TOPIC, value: Some(self.source_topic.as_str()) })
                .insert(Header { key: H_PARTITION, value: Some(partition.as_str()) })
                .insert(Header { key: H_OFFSET, value: Some(offset.as_str()) });
            if let Some(b) = &index {
                headers = headers.insert(Header { key: H_BATCH_INDEX, value: Some(b.as_str()) });
            }
            let mut record =
                BaseRecord::with_opaque_to(&self.topic, Box::new((round, i))).payload(r.value).headers(headers);
            if let Some(k) = r.key {
                record = record.key(k);
            }
            self.producer.context().state.lock().expect("lock").outstanding.insert(i);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((e, rec))
                        if matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)) =>
                    {
                        self.producer.poll(Duration::from_millis(10));
                        record = rec;
                    }
                    Err((e, _)) => {
                        self.producer.context().state.lock().expect("lock").outstanding.remove(&i);
                        failed.push((i, Failure::of(&e)));
                        break;
                    }
                }
            }
        }
        self.producer.poll(Duration::ZERO);
        failed
    }

    /// The current round: the records queued since the last [`DeadLetters::wait_acks`] belong to
    /// it ([`Deliveries`]).
    pub fn round(&self) -> u64 {
        self.producer.context().state.lock().expect("lock").round
    }

    /// Whether `round` is still open and every record queued in it has been acknowledged, none
    /// failed, waiting up to `max` for the reports still outstanding (serving those that
    /// arrive). False at once if a record of the round failed or the round was closed: only its
    /// [`DeadLetters::wait_acks`] caller knows its failures.
    pub fn round_acknowledged(&self, round: u64, max: Duration) -> bool {
        let deadline = std::time::Instant::now() + max;
        loop {
            self.producer.poll(Duration::ZERO);
            {
                let s = self.producer.context().state.lock().expect("lock");
                if s.acknowledged(round) {
                    return true;
                }
                if s.round != round || !s.failed.is_empty() {
                    return false;
                }
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            self.producer.poll(Duration::from_millis(1));
        }
    }

    /// Waits until every queued record is acknowledged or failed (at most `timeout`); returns the
    /// failed ones, to retry, and closes the round ([`Deliveries`]). Records not acknowledged in
    /// time are purged from the queue (so they are not sent later, behind their retried copies) and
    /// reported failed; some may have been written: their copies carry the same source coordinates.
    pub fn wait_acks(&self, timeout: Duration) -> Vec<(usize, Failure)> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // Serves delivery reports as they arrive (flush() would wake up only every 100 ms).
            self.producer.poll(Duration::from_millis(1));
            if self.producer.context().state.lock().expect("lock").outstanding.is_empty() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                self.producer.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
                self.producer.poll(Duration::ZERO);
                let mut s = self.producer.context().state.lock().expect("lock");
                let late: Vec<usize> = s.outstanding.drain().collect();
                let late = late
                    .into_iter()
                    .map(|i| (i, Failure { error: "not acknowledged in time".into(), permanent: false }));
                s.failed.extend(late);
                break;
            }
        }
        self.producer.context().state.lock().expect("lock").close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode as C;

    /// A dead letter the broker refuses as it is stalls its partition visibly (PRODUCT.md §3:
    /// the source offset never moves past it); a broker that is away is waited for.
    #[test]
    fn a_late_report_of_a_closed_round_is_ignored() {
        let failure = || Some(Failure { error: "purged".into(), permanent: false });
        let mut d = Deliveries::default();
        // Round 0: records 0 and 1; 1 is not acknowledged in time and is purged.
        d.outstanding.extend([0, 1]);
        d.report(0, 0, None);
        let purged = d.outstanding.drain().map(|i| (i, Failure { error: "late".into(), permanent: false }));
        d.failed.extend(purged);
        assert_eq!(d.close().iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1]);
        // Round 1 (the next batch, or the retry): record 1 again, then round 0's late report.
        d.outstanding.extend([0, 1]);
        d.report(0, 1, failure());
        assert!(
            d.outstanding.contains(&1) && d.failed.is_empty(),
            "round 0's report does not stand for round 1's record"
        );
        d.report(1, 1, None);
        d.report(1, 0, failure());
        assert!(d.outstanding.is_empty());
        assert_eq!(d.close().iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0]);
        assert_eq!(d.round, 2);
    }

    /// A revocation commits a written batch only if its round is open and every one of its
    /// records acknowledged: not while one is outstanding, not after one failed, and never for a
    /// round already closed (its failures may be waiting for a re-send).
    #[test]
    fn a_round_is_acknowledged_only_while_open_and_whole() {
        let mut d = Deliveries::default();
        assert!(d.acknowledged(0), "a round without records");
        d.outstanding.extend([0, 1]);
        d.report(0, 0, None);
        assert!(!d.acknowledged(0), "record 1 is outstanding");
        d.report(0, 1, Some(Failure { error: "refused".into(), permanent: true }));
        assert!(!d.acknowledged(0), "record 1 failed");
        assert_eq!(d.close().len(), 1);
        assert!(!d.acknowledged(0), "round 0 is closed, its failure is the caller's to re-send");
        assert!(d.acknowledged(1), "round 1 has no records yet");
    }

    #[test]
    fn refusals_that_no_retry_fixes_are_permanent() {
        for c in [C::MessageSizeTooLarge, C::UnknownTopicOrPartition, C::UnknownTopic, C::TopicAuthorizationFailed] {
            assert!(super::is_permanent(c), "{c:?}");
        }
        for c in
            [C::BrokerTransportFailure, C::AllBrokersDown, C::RequestTimedOut, C::NotLeaderForPartition, C::QueueFull]
        {
            assert!(!super::is_permanent(c), "{c:?}");
        }
    }
}
