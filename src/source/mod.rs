//! The Kafka side of ingest: the consumer-group member, its rebalance bookkeeping and the loop
//! that turns polled messages into written, committed batches.

pub mod rebalance;
pub mod worker;

use rdkafka::config::ClientConfig;

use crate::config::KafkaConfig;

/// Client settings shared by the consumer and the dead-letter producer; `kafka.options` last, so
/// operators can override anything.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers).set("client.id", "tally-ingest");
    for (k, v) in &cfg.options {
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
