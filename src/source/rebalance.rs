//! Rebalance bookkeeping. librdkafka calls the context from inside `poll`, on the worker's own
//! thread: the worker applies the recorded changes after each poll, drops the state and pending
//! rows of revoked partitions, and never commits for a partition it no longer owns.
//!
//! The one thing that runs beside `poll` is the writer thread's INSERT of the previous batch.
//! A revocation waits for it ([`WriteGate`]) before librdkafka may hand the partitions to another
//! member: the next owner loads its dedupe state only after every row this worker sent for them
//! has landed or failed.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// Whether an INSERT is in flight on the writer thread; a revocation waits until none is.
#[derive(Default)]
pub struct WriteGate {
    busy: Mutex<bool>,
    idle: Condvar,
}

/// Marks an INSERT in flight until dropped (also when the writer thread panics).
pub struct InFlight(Arc<WriteGate>);

impl WriteGate {
    /// Marks the start of an INSERT; the returned guard ends it.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        *self.busy.lock().expect("lock") = true;
        InFlight(self.clone())
    }

    /// Waits until no INSERT is in flight, at most `max`; false if one still is.
    pub fn wait_idle(&self, max: Duration) -> bool {
        let until = Instant::now() + max;
        let mut busy = self.busy.lock().expect("lock");
        while *busy {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            busy = self.idle.wait_timeout(busy, left).expect("lock").0;
        }
        true
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.busy.lock().expect("lock") = false;
        self.0.idle.notify_all();
    }
}

#[derive(Default)]
pub struct Context {
    topic: String,
    changes: Mutex<Vec<Change>>,
    /// The writer thread's INSERT, waited for by revocations.
    pub gate: Arc<WriteGate>,
    /// How long a revocation waits for an INSERT in flight: the request's own timeout and then
    /// some (it cannot take longer unless the HTTP client hangs).
    revoke_wait: Duration,
}

impl Context {
    /// `insert_timeout` is `clickhouse.timeout_secs`.
    pub fn new(topic: &str, insert_timeout: Duration) -> Self {
        Context {
            topic: topic.to_string(),
            changes: Mutex::default(),
            gate: Arc::default(),
            revoke_wait: insert_timeout + Duration::from_secs(5),
        }
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
            // The previous batch's INSERT may be in flight: let it land (or fail) before the
            // partitions can be assigned to someone who will rebuild their state from ClickHouse.
            let t = Instant::now();
            let idle = self.gate.wait_idle(self.revoke_wait);
            if idle && t.elapsed() >= Duration::from_millis(1) {
                tracing::info!(
                    partitions = ?ps,
                    waited_ms = t.elapsed().as_millis() as u64,
                    "revocation waited for the INSERT in flight"
                );
            }
            if !idle {
                tracing::error!(
                    partitions = ?ps,
                    "an INSERT is still in flight past clickhouse.timeout_secs at revocation; \
                     the next owner fences it before loading its state (docs/exactly-once.md, zombie writers)"
                );
            }
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
