//! Rebalance bookkeeping. librdkafka calls the context from inside `poll`, on the worker's own
//! thread, so a callback never races a batch: the worker applies the recorded changes after each
//! poll, drops the state and pending rows of revoked partitions, and never commits for a
//! partition it no longer owns.

use std::sync::Mutex;

use metrics::{counter, gauge};
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;

use crate::metrics as m;

/// A change of assignment, in the order librdkafka reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Revoked(Vec<i32>),
    Assigned(Vec<i32>),
}

#[derive(Default)]
pub struct Context {
    topic: String,
    changes: Mutex<Vec<Change>>,
}

impl Context {
    pub fn new(topic: &str) -> Self {
        Context { topic: topic.to_string(), changes: Mutex::default() }
    }

    /// Takes the changes recorded since the last call.
    pub fn take_changes(&self) -> Vec<Change> {
        std::mem::take(&mut *self.changes.lock().expect("lock"))
    }

    fn partitions(&self, tpl: &rdkafka::TopicPartitionList) -> Vec<i32> {
        tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect()
    }
}

impl ClientContext for Context {
    fn stats(&self, stats: Statistics) {
        if let Some(t) = stats.topics.get(&self.topic) {
            for (p, ps) in &t.partitions {
                if *p < 0 || ps.fetch_state == "none" {
                    continue;
                }
                let label = p.to_string();
                if ps.consumer_lag >= 0 {
                    gauge!(m::CONSUMER_LAG, "partition" => label.clone()).set(ps.consumer_lag as f64);
                }
                if ps.committed_offset >= 0 {
                    gauge!(m::COMMITTED_OFFSET, "partition" => label).set(ps.committed_offset as f64);
                }
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        counter!(m::BROKER_ERRORS).increment(1);
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let ps = self.partitions(tpl);
            counter!(m::REBALANCES, "kind" => "revoke").increment(1);
            tracing::info!(partitions = ?ps, "partitions revoked");
            self.changes.lock().expect("lock").push(Change::Revoked(ps));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let ps = self.partitions(tpl);
            counter!(m::REBALANCES, "kind" => "assign").increment(1);
            tracing::info!(partitions = ?ps, "partitions assigned");
            self.changes.lock().expect("lock").push(Change::Assigned(ps));
        }
    }
}
