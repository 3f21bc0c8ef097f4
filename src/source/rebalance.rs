//! Rebalance bookkeeping. librdkafka calls the context from inside `poll`, on the worker's own
//! thread: the worker applies the recorded changes after each poll, drops the state and pending
//! rows of revoked partitions, and never commits for a partition it no longer owns.
//!
//! The one thing that runs beside `poll` is the writer thread's INSERT of the previous batch.
//! A revocation waits for it ([`WriteGate`]) before librdkafka may hand the partitions to another
//! member: the next owner loads its dedupe state only after every row this worker sent for them
//! has landed or failed. If that batch is written and its dead letters acknowledged, the
//! revocation commits its offsets for the revoked partitions ([`Unlanded`]), so that the next
//! owner does not read it again.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::dlq::DeadLetters;
use crate::metrics as m;

/// How long a revocation waits for the acknowledgements of a written batch's dead letters
/// before it leaves the batch to be read again by the next owner. Short: every member of the
/// group waits for this callback.
const REVOKE_ACK_WAIT: Duration = Duration::from_millis(500);

/// The batch sent last and not landed yet, as far as a revocation needs it
/// (docs/exactly-once.md, "Commits at revocation"). The worker sets it when it sends the batch
/// and clears it when the batch lands; the writer thread marks it written.
#[derive(Debug)]
pub struct Unlanded {
    /// Per partition, the offset to commit once the batch is written: partitions revoked since
    /// it was sent are removed at their revocation, so it never commits for a later assignment.
    pub next: BTreeMap<i32, i64>,
    /// Its INSERT answered 200 (set by the writer thread before it ends the [`WriteGate`]).
    pub written: bool,
    /// Where its dead letters are.
    pub dead_letters: DeadLetterAcks,
}

impl Unlanded {
    /// The batch sent with offsets `next` and partition epochs `epochs`, keeping only the
    /// partitions still owned at those epochs (`owns(partition, epoch)`): a partition revoked —
    /// and perhaps assigned back — since the batch was staged had its rows dropped from the
    /// batch, and its offset must never be committed for it.
    pub fn new(
        next: &BTreeMap<i32, i64>,
        epochs: &BTreeMap<i32, u64>,
        owns: impl Fn(i32, u64) -> bool,
        dead_letters: DeadLetterAcks,
    ) -> Self {
        let next =
            next.iter().filter(|(p, _)| epochs.get(p).is_some_and(|e| owns(**p, *e))).map(|(p, o)| (*p, *o)).collect();
        Unlanded { next, written: false, dead_letters }
    }

    /// Whether a revocation may commit the batch: written, and its dead letters acknowledged
    /// (`round_acknowledged` answers for a round still open).
    pub fn committable(&self, round_acknowledged: impl FnOnce(u64) -> bool) -> bool {
        self.written
            && match self.dead_letters {
                DeadLetterAcks::Acknowledged => true,
                DeadLetterAcks::InRound(round) => round_acknowledged(round),
                DeadLetterAcks::Unknown => false,
            }
    }
}

/// Whether the dead letters of an [`Unlanded`] batch are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterAcks {
    /// All of them (or it has none).
    Acknowledged,
    /// Queued in this round of the dead-letter producer: acknowledged once the round is
    /// ([`DeadLetters::round_acknowledged`]).
    InRound(u64),
    /// Only the worker's land step can tell (some could not be queued, or are being re-sent).
    Unknown,
}

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

pub struct Context {
    topic: String,
    changes: Mutex<Vec<Change>>,
    /// The writer thread's INSERT, waited for by revocations.
    pub gate: Arc<WriteGate>,
    /// The batch sent and not landed, committed by a revocation once written.
    pub unlanded: Arc<Mutex<Option<Unlanded>>>,
    /// The dead-letter producer, asked whether an unlanded batch's round is acknowledged.
    dlq: Arc<DeadLetters>,
    /// How long a revocation waits for an INSERT in flight: the request's own timeout and then
    /// some (it cannot take longer unless the HTTP client hangs).
    revoke_wait: Duration,
}

impl Context {
    /// `insert_timeout` is `clickhouse.timeout_secs`; `dlq` is the worker's dead-letter producer.
    pub fn new(topic: &str, insert_timeout: Duration, dlq: Arc<DeadLetters>) -> Self {
        Context {
            topic: topic.to_string(),
            changes: Mutex::default(),
            gate: Arc::default(),
            unlanded: Arc::default(),
            dlq,
            revoke_wait: insert_timeout + Duration::from_secs(5),
        }
    }

    /// In the revoke callback: forgets the unlanded batch's offsets of the `revoked` partitions
    /// and, if no INSERT is in flight (`idle`), commits them when the batch is written and its
    /// dead letters are acknowledged — the conditions under which the land step commits it.
    /// The partitions are still this member's (librdkafka has not unassigned them yet), so the
    /// commit is of the current generation. If it fails, the next owner reads the batch again and
    /// finds its rows, as without it.
    fn commit_unlanded(&self, consumer: &BaseConsumer<Self>, revoked: &[i32], idle: bool) {
        let mut slot = self.unlanded.lock().expect("lock");
        let Some(u) = slot.as_mut() else { return };
        let offsets: Vec<(i32, i64)> = revoked.iter().filter_map(|p| u.next.remove(p).map(|o| (*p, o))).collect();
        if offsets.is_empty() || !idle {
            return;
        }
        if !u.written {
            tracing::info!(partitions = ?revoked, "batch not committed at revocation: its INSERT failed and is retried");
            return;
        }
        if !u.committable(|round| self.dlq.round_acknowledged(round, REVOKE_ACK_WAIT)) {
            tracing::info!(
                partitions = ?revoked,
                "written batch not committed at revocation: its dead letters are not all acknowledged"
            );
            return;
        }
        if consumer.assignment_lost() {
            // Expelled from the group: the partitions are someone else's already.
            tracing::info!(partitions = ?revoked, "written batch not committed at revocation: the assignment was lost");
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &offsets {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o)).expect("valid offset");
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                counter!(m::COMMITS).increment(1);
                counter!(m::REVOCATION_COMMITS).increment(1);
                tracing::info!(offsets = ?offsets, "written batch committed at revocation");
            }
            Err(e) => {
                counter!(m::COMMIT_ERRORS).increment(1);
                tracing::warn!(error = %e, "commit at revocation failed; the next owner reads the written batch again");
            }
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
                if ps.hi_offset >= 0 && ps.ls_offset >= 0 {
                    gauge!(m::UNSTABLE_MESSAGES, "partition" => label.clone())
                        .set((ps.hi_offset - ps.ls_offset).max(0) as f64);
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
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
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
            self.commit_unlanded(consumer, &ps, idle);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's offsets are kept only for partitions owned at the batch's epochs: partition 1
    /// was revoked and assigned back (epoch 2 → 5) while the batch before landed, partition 2
    /// revoked for good; their offsets would commit messages whose rows were dropped.
    #[test]
    fn a_batch_commits_only_partitions_owned_at_its_epochs() {
        let next = BTreeMap::from([(0, 10), (1, 20), (2, 30)]);
        let epochs = BTreeMap::from([(0, 1), (1, 2), (2, 3)]);
        let owned = BTreeMap::from([(0, 1), (1, 5)]);
        let u = Unlanded::new(&next, &epochs, |p, e| owned.get(&p) == Some(&e), DeadLetterAcks::Acknowledged);
        assert_eq!(u.next, BTreeMap::from([(0, 10)]));
        assert!(!u.written);
    }

    /// Committable only once written, and only with every dead letter acknowledged: a round is
    /// asked about only while the batch is written and its dead letters are in that round.
    #[test]
    fn a_batch_is_committable_only_written_with_its_dead_letters_acknowledged() {
        let mut u = Unlanded::new(&BTreeMap::new(), &BTreeMap::new(), |_, _| true, DeadLetterAcks::Acknowledged);
        assert!(!u.committable(|_| panic!("no round to ask about")), "not written yet");
        u.written = true;
        assert!(u.committable(|_| panic!("no round to ask about")));
        u.dead_letters = DeadLetterAcks::Unknown;
        assert!(!u.committable(|_| panic!("no round to ask about")), "dead letters only the land step can tell");
        u.dead_letters = DeadLetterAcks::InRound(7);
        assert!(!u.committable(|r| {
            assert_eq!(r, 7);
            false
        }));
        assert!(u.committable(|r| r == 7));
    }
}
