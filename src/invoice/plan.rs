//! Planning, a pure function: for one bucket of one (org, meter), given tally's value, the ledger's
//! pushes and (optionally) Stripe's value, decide what to send and what to report.
//!
//! The ledger decides what was pushed; Stripe's summaries are only compared (they lag). Additive
//! meters push deltas (`tally − ledger`); unique meters push the period's distinct count as a
//! `last` value. Over-reports are cancelled (our own pushes younger than [`CANCEL_WINDOW_SECS`])
//! and re-pushed at the right value, or reported as `needs_credit`.

use serde::Serialize;

use super::ledger::{push_id, Action, Entry, Outcome, Push};

/// Stripe refuses meter events older than 35 days or more than 5 minutes ahead.
pub const MAX_EVENT_AGE_SECS: i64 = 35 * 86_400;
pub const MAX_FUTURE_SECS: i64 = 300;
/// Kept from Stripe's 35-day edge so that a push planned now is still accepted when it is sent.
pub const AGE_MARGIN_SECS: i64 = 3600;
/// Our own pushes are cancelled only while younger than this (Stripe allows 24 h).
pub const CANCEL_WINDOW_SECS: i64 = 23 * 3600;
/// A pending intent older than this is not resent: Stripe keeps idempotency keys for 24 h, so a
/// resend could no longer be recognised as one.
pub const RESEND_WINDOW_SECS: i64 = 23 * 3600;
/// Room for this many successive `last` values of a unique meter at the end of a past period.
const SET_SLOTS: i64 = 1000;

/// Where a bucket goes in Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub customer: String,
    /// Stripe meter id, or subscription item id in legacy mode.
    pub target: String,
    pub event_name: String,
}

/// Everything known about one bucket.
#[derive(Debug, Clone)]
pub struct Bucket<'a> {
    pub org_id: String,
    pub meter: String,
    pub start: i64,
    pub end: i64,
    pub unique: bool,
    /// `None`: no customer or meter mapping.
    pub target: Option<Target>,
    pub tally: u64,
    /// Stripe's value for exactly this bucket, when Stripe can say (not in legacy mode).
    pub stripe: Option<u64>,
    pub pushes: Vec<&'a Push>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Stripe's summary has not caught up with the ledger yet (summaries are eventually consistent).
    StripeLagging,
    /// Delta to push (dry run), or pushed (after `--apply`).
    Push,
    /// Over-report: our pushes cancelled and the right value pushed again.
    Correct,
    /// A push of an earlier run whose outcome is unknown; `--apply` resends it first.
    Pending,
    /// The bucket starts more than 5 minutes in the future.
    Future,
    TooOldForStripe,
    /// Stripe holds more than the ledger says was pushed (another system, or a correction not cancellable).
    StripeAhead,
    NeedsCredit,
    Unmapped,
    /// An intent too old to be resent safely: check Stripe by hand (docs/invoicing.md).
    Unresolved,
    /// Stripe refused a push.
    Failed,
}

impl Status {
    /// Whether the bucket is reconciled.
    pub fn settled(self) -> bool {
        matches!(self, Status::Ok | Status::StripeLagging)
    }

    /// Errors make the run exit 1; other unsettled statuses exit 2.
    pub fn is_error(self) -> bool {
        matches!(self, Status::Failed | Status::Unresolved)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::StripeLagging => "stripe_lagging",
            Status::Push => "push",
            Status::Correct => "correct",
            Status::Pending => "pending",
            Status::Future => "future",
            Status::TooOldForStripe => "too_old_for_stripe",
            Status::StripeAhead => "stripe_ahead",
            Status::NeedsCredit => "needs_credit",
            Status::Unmapped => "unmapped",
            Status::Unresolved => "unresolved",
            Status::Failed => "failed",
        }
    }
}

/// The decision for one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    pub status: Status,
    /// What the ledger says Stripe holds (pending pushes counted as pushed).
    pub ledger: u64,
    /// Over-reported amount that needs a credit note.
    pub needs_credit: u64,
    /// Cancels come first; pushes are planned again once the cancels are done.
    pub actions: Vec<Entry>,
    pub note: String,
}

pub struct Ctx<'a> {
    pub mode: &'a str,
    pub account: &'a str,
    pub now: i64,
    /// Legacy usage records cannot be cancelled.
    pub can_cancel: bool,
}

impl BucketPlan {
    fn status(status: Status, ledger: u64, note: impl Into<String>) -> Self {
        BucketPlan { status, ledger, needs_credit: 0, actions: Vec::new(), note: note.into() }
    }
}

/// Plans one bucket.
pub fn plan(ctx: &Ctx, b: &Bucket) -> BucketPlan {
    let Some(t) = &b.target else {
        let st = if b.tally > 0 || !b.pushes.is_empty() { Status::Unmapped } else { Status::Ok };
        return BucketPlan::status(st, 0, "no Stripe customer or meter mapped");
    };
    let pending: Vec<&&Push> = b.pushes.iter().filter(|p| p.outcome == Outcome::Pending).collect();
    if let Some(p) = pending.iter().find(|p| ctx.now - p.intent_at > RESEND_WINDOW_SECS) {
        return BucketPlan::status(
            Status::Unresolved,
            0,
            format!("intent {} is too old to resend safely", p.entry.push_id),
        );
    }
    if !pending.is_empty() {
        return BucketPlan::status(
            Status::Pending,
            0,
            format!("{} push(es) of an earlier run to resend", pending.len()),
        );
    }
    let next_seq = b.pushes.iter().map(|p| p.entry.seq).max().unwrap_or(0) + 1;
    let entry = |action: Action, seq: u32, value: u64, cancels: &str, event_ts: i64| Entry {
        push_id: push_id(ctx.mode, ctx.account, action, &t.customer, &t.target, b.start, b.end, seq),
        action,
        org_id: b.org_id.clone(),
        customer: t.customer.clone(),
        meter: b.meter.clone(),
        target: t.target.clone(),
        event_name: t.event_name.clone(),
        bucket_start: b.start,
        bucket_end: b.end,
        seq,
        value,
        cancels: cancels.to_string(),
        event_ts,
    };
    let done = |p: &&&Push| p.outcome == Outcome::Done;
    let oldest_allowed = ctx.now - MAX_EVENT_AGE_SECS + AGE_MARGIN_SECS;

    if b.unique {
        let last = b.pushes.iter().filter(done).filter(|p| p.entry.action == Action::Set).max_by_key(|p| p.entry.seq);
        let ledger = last.map_or(0, |p| p.entry.value);
        if b.tally == ledger {
            return compare(b, ledger);
        }
        let ts = match (ctx.can_cancel, last) {
            // Legacy `set` replaces the quantity at a timestamp: keep the first one.
            (false, Some(p)) => p.entry.event_ts,
            _ => {
                // Later values need later timestamps: `now` while the period runs, then up to
                // SET_SLOTS seconds before its end.
                let base = ctx.now.min(b.end - SET_SLOTS).max(b.start);
                last.map_or(base, |p| base.max(p.entry.event_ts + 1))
            }
        };
        if ts < oldest_allowed {
            return BucketPlan::status(Status::TooOldForStripe, ledger, "older than Stripe's 35 days");
        }
        if ts >= b.end || ts > ctx.now + MAX_FUTURE_SECS {
            return BucketPlan::status(Status::Future, ledger, "no later timestamp left for a new value");
        }
        let mut p = BucketPlan::status(Status::Push, ledger, "");
        p.actions.push(entry(Action::Set, next_seq, b.tally, "", ts));
        return p;
    }

    let cancelled: Vec<&str> = b
        .pushes
        .iter()
        .filter(done)
        .filter(|p| p.entry.action == Action::Cancel)
        .map(|p| p.entry.cancels.as_str())
        .collect();
    let refused: Vec<&str> = b
        .pushes
        .iter()
        .filter(|p| matches!(p.outcome, Outcome::Failed(_)) && p.entry.action == Action::Cancel)
        .map(|p| p.entry.cancels.as_str())
        .collect();
    let live: Vec<&&Push> = b
        .pushes
        .iter()
        .filter(done)
        .filter(|p| p.entry.action == Action::Push && !cancelled.contains(&p.entry.push_id.as_str()))
        .collect();
    let ledger: u64 = live.iter().map(|p| p.entry.value).sum();
    if b.tally == ledger {
        return compare(b, ledger);
    }
    if b.tally > ledger {
        let ts = b.start.max(oldest_allowed);
        if ts >= b.end {
            return BucketPlan::status(Status::TooOldForStripe, ledger, "older than Stripe's 35 days");
        }
        if ts > ctx.now + MAX_FUTURE_SECS {
            return BucketPlan::status(Status::Future, ledger, "bucket starts in the future");
        }
        let mut p = BucketPlan::status(Status::Push, ledger, "");
        p.actions.push(entry(Action::Push, next_seq, b.tally - ledger, "", ts));
        return p;
    }
    // Over-report: the ledger holds more than tally.
    let cancellable: Vec<&&&Push> = live
        .iter()
        .filter(|p| {
            ctx.can_cancel
                && !refused.contains(&p.entry.push_id.as_str())
                && p.done_at.is_some_and(|d| ctx.now - d < CANCEL_WINDOW_SECS)
        })
        .collect();
    let c: u64 = cancellable.iter().map(|p| p.entry.value).sum();
    if ledger - c > b.tally {
        let mut p = BucketPlan::status(Status::NeedsCredit, ledger, "over-reported; pushes too old to cancel");
        p.needs_credit = ledger - b.tally;
        return p;
    }
    let mut p = BucketPlan::status(
        Status::Correct,
        ledger,
        format!("cancel {} push(es), then push {}", cancellable.len(), b.tally - (ledger - c)),
    );
    for (i, q) in cancellable.iter().enumerate() {
        p.actions.push(entry(Action::Cancel, next_seq + i as u32, q.entry.value, &q.entry.push_id, q.entry.event_ts));
    }
    p
}

/// tally and the ledger agree: compare with Stripe's own figure where there is one.
fn compare(b: &Bucket, ledger: u64) -> BucketPlan {
    match b.stripe {
        Some(s) if s > ledger => {
            let mut p = BucketPlan::status(Status::StripeAhead, ledger, "Stripe holds usage tally did not push");
            p.needs_credit = s - b.tally.min(s);
            p
        }
        Some(s) if s < ledger => {
            BucketPlan::status(Status::StripeLagging, ledger, "Stripe's summary has not caught up")
        }
        _ => BucketPlan::status(Status::Ok, ledger, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoice::ledger::Push;

    const NOW: i64 = 1_800_000_000 + 1800; // 1_800_000_000 is a whole hour
    const H: i64 = NOW - 1800 - 3 * 3600;

    fn ctx() -> Ctx<'static> {
        Ctx { mode: "meters", account: "", now: NOW, can_cancel: true }
    }

    fn bucket<'a>(tally: u64, pushes: Vec<&'a Push>) -> Bucket<'a> {
        Bucket {
            org_id: "o".into(),
            meter: "events".into(),
            start: H,
            end: H + 3600,
            unique: false,
            target: Some(Target { customer: "cus_1".into(), target: "mtr_1".into(), event_name: "ev".into() }),
            tally,
            stripe: None,
            pushes,
        }
    }

    fn done(entry: Entry, at: i64) -> Push {
        Push { entry, outcome: Outcome::Done, intent_at: at, done_at: Some(at) }
    }

    #[test]
    fn pushes_the_delta_once_and_then_nothing() {
        let p = plan(&ctx(), &bucket(10, vec![]));
        assert_eq!(p.status, Status::Push);
        assert_eq!(p.actions.len(), 1);
        assert_eq!((p.actions[0].value, p.actions[0].seq, p.actions[0].event_ts), (10, 1, H));
        let first = done(p.actions[0].clone(), NOW);
        // Late events: exactly the difference, under a new id.
        let p2 = plan(&ctx(), &bucket(13, vec![&first]));
        assert_eq!((p2.status, p2.ledger, p2.actions[0].value, p2.actions[0].seq), (Status::Push, 10, 3, 2));
        assert_ne!(p2.actions[0].push_id, first.entry.push_id);
        let second = done(p2.actions[0].clone(), NOW);
        let p3 = plan(&ctx(), &bucket(13, vec![&first, &second]));
        assert_eq!((p3.status, p3.actions.len()), (Status::Ok, 0));
    }

    #[test]
    fn the_same_plan_gives_the_same_ids() {
        assert_eq!(plan(&ctx(), &bucket(10, vec![])).actions, plan(&ctx(), &bucket(10, vec![])).actions);
    }

    #[test]
    fn pending_intents_block_planning_until_resent() {
        let e = plan(&ctx(), &bucket(10, vec![])).actions[0].clone();
        let pending = Push { entry: e, outcome: Outcome::Pending, intent_at: NOW - 60, done_at: None };
        assert_eq!(plan(&ctx(), &bucket(10, vec![&pending])).status, Status::Pending);
        let stale = Push { intent_at: NOW - 24 * 3600, ..pending.clone() };
        assert_eq!(plan(&ctx(), &bucket(10, vec![&stale])).status, Status::Unresolved);
    }

    #[test]
    fn failed_pushes_count_for_nothing() {
        let e = plan(&ctx(), &bucket(10, vec![])).actions[0].clone();
        let failed = Push { entry: e, outcome: Outcome::Failed("no".into()), intent_at: NOW, done_at: None };
        let p = plan(&ctx(), &bucket(10, vec![&failed]));
        assert_eq!((p.status, p.ledger, p.actions[0].value, p.actions[0].seq), (Status::Push, 0, 10, 2));
    }

    #[test]
    fn over_reports_are_cancelled_when_young_and_credited_when_old() {
        let e = plan(&ctx(), &bucket(10, vec![])).actions[0].clone();
        let young = done(e.clone(), NOW - 3600);
        let p = plan(&ctx(), &bucket(7, vec![&young]));
        assert_eq!(p.status, Status::Correct);
        assert_eq!(p.actions.len(), 1);
        assert_eq!(
            (p.actions[0].action, p.actions[0].cancels.as_str(), p.actions[0].value),
            (Action::Cancel, e.push_id.as_str(), 10)
        );
        // Once the cancel is done, the right value is pushed again.
        let cancel = done(p.actions[0].clone(), NOW);
        let p2 = plan(&ctx(), &bucket(7, vec![&young, &cancel]));
        assert_eq!((p2.status, p2.ledger, p2.actions[0].value), (Status::Push, 0, 7));

        let old = done(e.clone(), NOW - 24 * 3600);
        let p = plan(&ctx(), &bucket(7, vec![&old]));
        assert_eq!((p.status, p.needs_credit, p.actions.len()), (Status::NeedsCredit, 3, 0));
        // A cancel Stripe refused makes the push uncancellable.
        let refused = Push { outcome: Outcome::Failed("too old".into()), ..cancel.clone() };
        let p = plan(&ctx(), &bucket(7, vec![&young, &refused]));
        assert_eq!((p.status, p.needs_credit), (Status::NeedsCredit, 3));
        let legacy = Ctx { can_cancel: false, ..ctx() };
        assert_eq!(plan(&legacy, &bucket(7, vec![&young])).status, Status::NeedsCredit);
    }

    #[test]
    fn stripe_window_is_respected() {
        let mut b = bucket(5, vec![]);
        b.start = NOW - 40 * 86_400 - 1800;
        b.end = b.start + 3600;
        assert_eq!(plan(&ctx(), &b).status, Status::TooOldForStripe);
        b.start = NOW + 3600 - 1800;
        b.end = b.start + 3600;
        assert_eq!(plan(&ctx(), &b).status, Status::Future);
        // A day bucket straddling the 35-day edge is pushed inside the allowed part.
        b.start = NOW - MAX_EVENT_AGE_SECS - 1800;
        b.end = b.start + 86_400;
        let p = plan(&ctx(), &b);
        assert_eq!(p.status, Status::Push);
        assert!(p.actions[0].event_ts >= NOW - MAX_EVENT_AGE_SECS && p.actions[0].event_ts < b.end);
    }

    #[test]
    fn unique_meters_push_increasing_last_values() {
        let mut b = bucket(40, vec![]);
        b.unique = true;
        b.start = NOW - 1800 - 10 * 86_400;
        b.end = NOW - 1800 + 3600;
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.actions[0].action, p.actions[0].value), (Status::Push, Action::Set, 40));
        let first = done(p.actions[0].clone(), NOW);
        let mut b2 = b.clone();
        b2.pushes = vec![&first];
        b2.tally = 38; // a correction lowers a `last` value without any cancel
        let p2 = plan(&ctx(), &b2);
        assert_eq!((p2.actions[0].action, p2.actions[0].value), (Action::Set, 38));
        assert!(p2.actions[0].event_ts > first.entry.event_ts, "the newer value must be the last one");
        b2.tally = 40;
        assert_eq!(plan(&ctx(), &b2).status, Status::Ok);
    }

    #[test]
    fn stripe_figures_are_compared_not_trusted() {
        let e = plan(&ctx(), &bucket(10, vec![])).actions[0].clone();
        let d = done(e, NOW);
        let mut b = bucket(10, vec![&d]);
        b.stripe = Some(4);
        assert_eq!(plan(&ctx(), &b).status, Status::StripeLagging);
        b.stripe = Some(15);
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.needs_credit), (Status::StripeAhead, 5));
        b.stripe = Some(10);
        assert_eq!(plan(&ctx(), &b).status, Status::Ok);
    }

    #[test]
    fn unmapped_usage_is_reported() {
        let mut b = bucket(3, vec![]);
        b.target = None;
        assert_eq!(plan(&ctx(), &b).status, Status::Unmapped);
        b.tally = 0;
        assert_eq!(plan(&ctx(), &b).status, Status::Ok);
    }
}
