//! Operator tools around the ingest topics: committed offsets of the group (show, wait, reset)
//! and a summary of the dead-letter topic.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::dlq;

fn partitions(c: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).context("failed to fetch metadata")?;
    let t = md.topics().iter().find(|t| t.name() == topic).context("topic not found")?;
    let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ps.sort_unstable();
    if ps.is_empty() {
        bail!("topic {topic} has no partitions (does it exist?)");
    }
    Ok(ps)
}

fn group_consumer(cfg: &KafkaConfig) -> anyhow::Result<BaseConsumer> {
    let mut c = crate::source::consumer_config(cfg);
    c.set("statistics.interval.ms", "0");
    c.create().context("failed to create consumer")
}

/// The group's committed offsets per partition of the source topic (-1: none).
pub fn committed(cfg: &KafkaConfig) -> anyhow::Result<BTreeMap<i32, i64>> {
    let c = group_consumer(cfg)?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions(&c, &cfg.topic)? {
        tpl.add_partition(&cfg.topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).context("failed to read committed offsets")?;
    Ok(got
        .elements()
        .iter()
        .map(|e| {
            (
                e.partition(),
                match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                },
            )
        })
        .collect())
}

/// Waits until every partition's committed offset reaches `target`.
pub fn wait_committed(cfg: &KafkaConfig, target: &BTreeMap<i32, i64>, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let now = committed(cfg)?;
        if target.iter().all(|(p, t)| now.get(p).is_some_and(|c| c >= t)) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("not caught up after {timeout:?}: committed {now:?}, target {target:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Commits `offset` for every partition (run with no worker in the group).
pub fn reset(cfg: &KafkaConfig, offset: i64) -> anyhow::Result<()> {
    let c = group_consumer(cfg)?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions(&c, &cfg.topic)? {
        tpl.add_partition_offset(&cfg.topic, p, Offset::Offset(offset))?;
    }
    c.commit(&tpl, CommitMode::Sync).context("failed to commit the reset offsets")?;
    Ok(())
}

/// One dead-letter record, as read back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeadLetter {
    pub reason: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub batch_index: Option<u32>,
    /// Any other header the caller asked for (e.g. the load generator's message id).
    pub tag: Option<String>,
}

/// Reads the whole dead-letter topic (until no record arrived for `idle`).
pub fn read_dead_letters(
    cfg: &KafkaConfig,
    tag_header: Option<&str>,
    idle: Duration,
) -> anyhow::Result<Vec<DeadLetter>> {
    let mut cc = crate::source::consumer_config(cfg);
    cc.set("group.id", format!("{}-dlq-reader", cfg.group_id)).set("statistics.interval.ms", "0");
    let c: BaseConsumer = cc.create().context("failed to create consumer")?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions(&c, &cfg.dlq_topic)? {
        tpl.add_partition_offset(&cfg.dlq_topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < idle {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last = Instant::now();
                let mut d = DeadLetter {
                    reason: String::new(),
                    source_partition: -1,
                    source_offset: -1,
                    batch_index: None,
                    tag: None,
                };
                // Header names as bytes: a dead letter copies the source message's headers whole,
                // and rdkafka's `Headers::iter` panics on a name that is not UTF-8.
                for (name, value) in crate::source::headers::raw_headers(&m) {
                    let v = value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
                    match name {
                        n if n == dlq::H_REASON.as_bytes() => d.reason = v,
                        n if n == dlq::H_PARTITION.as_bytes() => d.source_partition = v.parse().unwrap_or(-1),
                        n if n == dlq::H_OFFSET.as_bytes() => d.source_offset = v.parse().unwrap_or(-1),
                        n if n == dlq::H_BATCH_INDEX.as_bytes() => d.batch_index = v.parse().ok(),
                        n if tag_header.is_some_and(|t| n == t.as_bytes()) => d.tag = Some(v),
                        _ => {}
                    }
                }
                out.push(d);
            }
            Some(Err(e)) if undecodable(&e) => {
                // Every later fetch fails on the same record: a listing without it would be
                // silently short.
                anyhow::bail!(
                    "a dead letter cannot be decoded by this client ({e}); raise \
                     kafka.options.\"receive.message.max.bytes\" above its decompressed size"
                )
            }
            Some(Err(e)) => tracing::warn!(error = %e, "poll failed"),
            None => {}
        }
    }
    Ok(out)
}

/// Whether a consumer error is a record the client cannot decompress (librdkafka reports it
/// again on every fetch of its partition): a codec it was built without, corrupt data, or a zstd
/// record that decompresses beyond `receive.message.max.bytes`.
pub fn undecodable(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(e.rdkafka_error_code(), Some(C::BadCompression | C::NotImplemented))
}
