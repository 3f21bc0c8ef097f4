//! The Kafka side of ingest: the consumer-group member, its rebalance bookkeeping and the loop
//! that turns polled messages into written, committed batches.

pub mod gaps;
pub mod headers;
pub mod rebalance;
pub mod start;
pub mod worker;

use rdkafka::config::ClientConfig;

use crate::config::KafkaConfig;

/// Properties of `kafka.options` that only a consumer understands (a producer warns about them).
const CONSUMER_ONLY: &[&str] = &[
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "auto.offset.reset",
    "partition.assignment.strategy",
    "group.instance.id",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "fetch.wait.max.ms",
    "max.partition.fetch.bytes",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "isolation.level",
];

/// Client settings for producers (the dead-letter producer, the load generator):
/// `kafka.options` except the consumer-only ones, last so operators can override anything.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers).set("client.id", "tally-ingest");
    for (k, v) in cfg.options.iter().filter(|(k, _)| !CONSUMER_ONLY.contains(&k.as_str())) {
        c.set(k, v);
    }
    c
}

/// Consumer settings: offsets are committed by hand, only after ClickHouse acknowledged the data.
pub fn consumer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "tally-ingest")
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000");
    for (k, v) in &cfg.options {
        c.set(k, v);
    }
    c
}
