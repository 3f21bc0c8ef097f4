//! The ledger of pushes to Stripe, in ClickHouse (`stripe_ledger`, schemas/002_stripe_ledger.sql).
//!
//! Rows are append-only facts about a push id: `intent` (written and acknowledged before the
//! Stripe call), then `done` or `failed` (after it). [`fold`] turns rows into one [`Push`] per id.
//! The ledger, not Stripe's eventually consistent summaries, decides what was already pushed.

use std::collections::BTreeMap;

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::sql::{num, render, rows};
use crate::retry::Backoff;
use crate::sink::clickhouse::{quote, ChError, ClickHouse};
use crate::sink::rowbinary::RowWriter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Add `value` to the bucket (meter event with a `sum` meter, or usage record `increment`).
    Push,
    /// Make the bucket's value `value` (meter event on a `last` meter, or usage record `set`).
    Set,
    /// Cancel the push `cancels` (meter event adjustment).
    Cancel,
    /// Add `value` again because Stripe lost that much of the bucket's pushes after accepting
    /// them (`reconcile --apply --repair-missing`). It replaces usage the ledger already counts, so
    /// it does not change the ledger's value of the bucket.
    Repair,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Push => "push",
            Action::Set => "set",
            Action::Cancel => "cancel",
            Action::Repair => "repair",
        }
    }

    fn parse(s: &str) -> Result<Action, ChError> {
        match s {
            "push" => Ok(Action::Push),
            "set" => Ok(Action::Set),
            "cancel" => Ok(Action::Cancel),
            "repair" => Ok(Action::Repair),
            _ => Err(ChError::Response(format!("unknown ledger action {s:?}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Intent,
    Done,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Intent => "intent",
            State::Done => "done",
            State::Failed => "failed",
        }
    }
}

/// One push as planned: everything needed to send it again, identically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The meter event `identifier` / usage record Idempotency-Key; deterministic (see [`push_id`]).
    pub push_id: String,
    pub action: Action,
    pub org_id: String,
    pub customer: String,
    /// tally meter.
    pub meter: String,
    /// Stripe meter id (meters mode) or subscription item id (legacy mode).
    pub target: String,
    pub event_name: String,
    pub bucket_start: i64,
    pub bucket_end: i64,
    pub seq: u32,
    /// Push: the delta; Set: the new value; Cancel: the value of the cancelled push.
    pub value: u64,
    /// Cancel: the push id cancelled.
    pub cancels: String,
    /// The timestamp sent to Stripe.
    pub event_ts: i64,
    /// Why the write was planned, when it is not an ordinary delta (a repair says what Stripe
    /// held and when); stored in the intent row's `detail`.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Intent recorded, outcome unknown (a crash or an indeterminate error): resend identically.
    Pending,
    Done,
    /// Stripe refused it; it had no effect.
    Failed(String),
}

/// A push and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub entry: Entry,
    pub outcome: Outcome,
    pub intent_at: i64,
    pub done_at: Option<i64>,
    /// The run that recorded the outcome (the intent's run while pending).
    pub run_id: String,
}

/// The deterministic id of the `seq`-th push of a bucket: the same plan after a crash yields the
/// same id, so Stripe sees a resend, never a second push.
#[allow(clippy::too_many_arguments)]
pub fn push_id(
    mode: &str,
    account: &str,
    action: Action,
    customer: &str,
    target: &str,
    start: i64,
    end: i64,
    seq: u32,
) -> String {
    let mut h = Sha256::new();
    for part in
        [mode, account, action.as_str(), customer, target, &start.to_string(), &end.to_string(), &seq.to_string()]
    {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    format!("tally_{}", &hex::encode(h.finalize())[..40])
}

/// One ledger row as read back.
#[derive(Debug, Clone)]
pub struct Record {
    pub entry: Entry,
    pub state: State,
    /// `recorded_at`, Unix seconds.
    pub at: i64,
    /// Intent: why it was planned; failed: Stripe's refusal (prefixed by its class, see
    /// [`super::plan::Refusal`]).
    pub detail: String,
    pub run_id: String,
}

/// Folds ledger rows into pushes: done if any `done` row, else failed if any `failed` row, else pending.
///
/// A `done` row whose detail is [`LANDED_BY_HAND`] is a person's finding of when the write
/// arrived at Stripe (from the invoice that does or does not bill it): its `recorded_at` becomes
/// both the intent and the answer time, over every other row (docs/invoicing.md, "Writes landing
/// after the finalization"). Several such rows span from the earliest to the latest: findings
/// on both sides of the finalization leave the write undecided, whatever order they are read in.
pub fn fold(records: Vec<Record>) -> Vec<Push> {
    let mut by_id: BTreeMap<String, Push> = BTreeMap::new();
    // Per push, the earliest and the latest time found by hand.
    let mut landed: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for Record { entry, state, at, detail, run_id } in records {
        if state == State::Done && detail == LANDED_BY_HAND {
            let l = landed.entry(entry.push_id.clone()).or_insert((at, at));
            *l = (l.0.min(at), l.1.max(at));
        }
        let p = by_id.entry(entry.push_id.clone()).or_insert_with(|| Push {
            entry: Entry { reason: String::new(), ..entry.clone() },
            outcome: Outcome::Pending,
            intent_at: at,
            done_at: None,
            run_id: run_id.clone(),
        });
        match state {
            State::Intent => {
                p.intent_at = p.intent_at.min(at);
                if p.entry.reason.is_empty() {
                    p.entry.reason = detail;
                }
            }
            State::Done => {
                if p.done_at.is_none_or(|d| at < d) {
                    p.run_id = run_id;
                }
                p.outcome = Outcome::Done;
                p.done_at = Some(p.done_at.map_or(at, |d| d.min(at)));
            }
            State::Failed => {
                if p.outcome != Outcome::Done {
                    p.outcome = Outcome::Failed(detail);
                    p.run_id = run_id;
                }
            }
        }
    }
    for (id, (first, last)) in landed {
        if let Some(p) = by_id.get_mut(&id) {
            (p.intent_at, p.done_at) = (first, Some(last));
        }
    }
    by_id.into_values().collect()
}

/// The detail of a `done` row recorded by hand to say when a write arrived at Stripe ([`fold`]).
pub const LANDED_BY_HAND: &str = "landed";

/// The ledger of one Stripe mode and account.
pub struct Ledger<'a> {
    ch: &'a ClickHouse,
    mode: &'static str,
    account: String,
    run_id: String,
    /// How long a ClickHouse outage is waited out before the run gives up.
    wait: Duration,
}

impl<'a> Ledger<'a> {
    pub fn new(ch: &'a ClickHouse, mode: &'static str, account: &str, run_id: &str, wait: Duration) -> Self {
        Ledger { ch, mode, account: account.to_string(), run_id: run_id.to_string(), wait }
    }

    /// Runs `f` until it succeeds, retrying transient failures with backoff for up to `wait`.
    /// A retried append may land twice: harmless, [`fold`] reads facts, not counts.
    fn retrying<T>(&self, op: &'static str, mut f: impl FnMut() -> Result<T, ChError>) -> Result<T, ChError> {
        let deadline = std::time::Instant::now() + self.wait;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match f() {
                Err(e) if e.is_transient() && std::time::Instant::now() < deadline => {
                    let delay = backoff.next_delay();
                    tracing::warn!(op, error = %e, retry_ms = delay.as_millis() as u64, "ledger: waiting for clickhouse");
                    std::thread::sleep(delay);
                }
                other => return other,
            }
        }
    }

    pub fn mode(&self) -> &'static str {
        self.mode
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    /// Appends rows; returns only once ClickHouse acknowledged them.
    pub fn append(&self, rows: &[(&Entry, State, &str)], now: i64) -> Result<(), ChError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut w = RowWriter::default();
        for (e, state, detail) in rows {
            w.string(&e.push_id);
            w.string(state.as_str());
            w.string(e.action.as_str());
            w.string(self.mode);
            w.string(&self.account);
            w.string(&e.org_id);
            w.string(&e.customer);
            w.string(&e.meter);
            w.string(&e.target);
            w.string(&e.event_name);
            w.datetime(e.bucket_start);
            w.datetime(e.bucket_end);
            w.u32(e.seq);
            w.u64(e.value);
            w.string(&e.cancels);
            w.datetime(e.event_ts);
            w.string(&self.run_id);
            w.string(detail);
            w.datetime(now);
        }
        let db = self.ch.database();
        let insert = format!(
            "INSERT INTO {db}.stripe_ledger (push_id, state, action, mode, account, org_id, customer, meter, \
                 target, event_name, bucket_start, bucket_end, seq, value, cancels, event_ts, run_id, detail, \
                 recorded_at) FORMAT RowBinary"
        );
        self.retrying("append", || self.ch.insert(&insert, &w.buf))
    }

    /// The pushes whose bucket overlaps [from, to).
    pub fn read(&self, from: i64, to: i64) -> Result<Vec<Push>, ChError> {
        let sql = render(
            super::sql::LEDGER_READ,
            &[
                ("database", self.ch.database().to_string()),
                ("from", from.to_string()),
                ("to", to.to_string()),
                ("mode", quote(self.mode)),
                ("account", quote(&self.account)),
            ],
        );
        let mut records = Vec::new();
        for r in self.retrying("read", || rows(self.ch, &sql))? {
            if r.len() != 17 {
                return Err(ChError::Response(format!("ledger row with {} columns", r.len())));
            }
            let state = match r[1].as_str() {
                "intent" => State::Intent,
                "done" => State::Done,
                "failed" => State::Failed,
                s => return Err(ChError::Response(format!("unknown ledger state {s:?}"))),
            };
            let entry = Entry {
                push_id: r[0].clone(),
                action: Action::parse(&r[2])?,
                org_id: r[3].clone(),
                customer: r[4].clone(),
                meter: r[5].clone(),
                target: r[6].clone(),
                event_name: r[7].clone(),
                bucket_start: num(&r[8])?,
                bucket_end: num(&r[9])?,
                seq: num(&r[10])?,
                value: num(&r[11])?,
                cancels: r[12].clone(),
                event_ts: num(&r[13])?,
                reason: String::new(),
            };
            records.push(Record { entry, state, at: num(&r[14])?, detail: r[15].clone(), run_id: r[16].clone() });
        }
        Ok(fold(records))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Entry {
        Entry {
            push_id: id.into(),
            action: Action::Push,
            org_id: "o".into(),
            customer: "cus".into(),
            meter: "events".into(),
            target: "mtr".into(),
            event_name: "e".into(),
            bucket_start: 0,
            bucket_end: 3600,
            seq: 1,
            value: 5,
            cancels: String::new(),
            event_ts: 0,
            reason: String::new(),
        }
    }

    fn rec(id: &str, state: State, at: i64, detail: &str) -> Record {
        Record { entry: entry(id), state, at, detail: detail.into(), run_id: format!("run{at}") }
    }

    #[test]
    fn fold_decides_by_the_strongest_fact() {
        let rows = vec![
            rec("a", State::Intent, 10, "repair: why"),
            rec("b", State::Intent, 11, ""),
            rec("b", State::Done, 12, ""),
            rec("c", State::Intent, 13, ""),
            rec("c", State::Failed, 14, "refused"),
            rec("b", State::Intent, 15, ""), // a resend after a crash
        ];
        let p = fold(rows);
        assert_eq!(p.len(), 3);
        assert_eq!((&p[0].outcome, p[0].entry.reason.as_str()), (&Outcome::Pending, "repair: why"));
        assert_eq!(p[1].run_id, "run12", "the run that recorded the outcome");
        assert_eq!(p[1].outcome, Outcome::Done);
        assert_eq!((p[1].intent_at, p[1].done_at), (11, Some(12)));
        assert_eq!(p[2].outcome, Outcome::Failed("refused".into()));
        // When a write landed, found by hand, is the strongest fact of its times.
        let p = fold(vec![
            rec("d", State::Intent, 20, ""),
            rec("d", State::Done, 30, LANDED_BY_HAND),
            rec("d", State::Done, 25, ""),
            rec("d", State::Intent, 21, ""),
        ]);
        assert_eq!((p[0].intent_at, p[0].done_at, &p[0].outcome), (30, Some(30), &Outcome::Done));
        let two = |a, b| fold(vec![rec("e", State::Done, a, LANDED_BY_HAND), rec("e", State::Done, b, LANDED_BY_HAND)]);
        for p in [two(40, 50), two(50, 40)] {
            assert_eq!((p[0].intent_at, p[0].done_at), (40, Some(50)), "in either order");
        }
    }

    #[test]
    fn push_ids_are_deterministic_and_distinct() {
        let a = push_id("meters", "", Action::Push, "cus_1", "mtr_1", 0, 3600, 1);
        assert_eq!(a, push_id("meters", "", Action::Push, "cus_1", "mtr_1", 0, 3600, 1));
        assert_ne!(a, push_id("meters", "", Action::Push, "cus_1", "mtr_1", 0, 3600, 2));
        assert_ne!(a, push_id("meters", "", Action::Cancel, "cus_1", "mtr_1", 0, 3600, 1));
        assert_ne!(a, push_id("meters", "acct_1", Action::Push, "cus_1", "mtr_1", 0, 3600, 1));
        assert!(a.len() <= 100);
    }
}
