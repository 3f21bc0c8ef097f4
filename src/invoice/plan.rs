//! Planning, a pure function: for one bucket of one (org, meter), given tally's value, the ledger's
//! pushes and (optionally) Stripe's value, decide what to send and what to report.
//!
//! The ledger decides what was pushed; Stripe's summaries are only compared (they lag). Additive
//! meters push deltas (`tally − ledger`); unique meters push the period's distinct count as a
//! `last` value. Over-reports are cancelled (our own pushes younger than [`CANCEL_WINDOW_SECS`])
//! and re-pushed at the right value, or reported as `needs_credit`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::ledger::{push_id, Action, Entry, Outcome, Push};
use super::stripe::invoices::{period_of, FinalPeriod};

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
/// Why a bucket whose repair was lost too is not repaired again unasked.
const LOST_AGAIN: &str =
    "an earlier repair of this bucket was lost too: fix the cause Stripe's meter error reports name, \
                          then --repair-missing --retry-failed";
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
    /// Where Stripe still bills usage from. Legacy mode: the start of the subscription's current
    /// billing period (Stripe refuses usage records before it). Meters mode: the end of the
    /// latest usage period whose invoice Stripe has finalized (it would take a meter event
    /// before it, but no invoice would bill it; `stripe::invoices`), `None` when no
    /// subscription's invoice has closed a period; Stripe's 35-day window applies as well.
    pub open_from: Option<i64>,
    /// Meters mode: the billing periods of cycle invoices (`stripe::invoices`) that end after the
    /// bucket starts, with when Stripe finalized them (`None`: a draft) ([`Landing`]).
    pub finals: Vec<FinalPeriod>,
    pub pushes: Vec<&'a Push>,
    /// Why the bucket's (org, meter) is refused: one of its totals needs more than 64 bits
    /// (PRODUCT.md §1). Nothing is written for a refused pair; it is reported as `total_overflow`.
    pub overflow: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Stripe's summary has not caught up with the ledger yet: the bucket's last write is younger
    /// than the settle time (summaries are eventually consistent).
    StripeLagging,
    /// Delta to push (dry run), or pushed (after `--apply`).
    Push,
    /// Over-report: our pushes cancelled and the right value pushed again.
    Correct,
    /// What Stripe lost is pushed again (`--repair-missing`).
    Repair,
    /// A push of an earlier run whose outcome is unknown; `--apply` resends it first.
    Pending,
    /// The bucket starts more than 5 minutes in the future.
    Future,
    /// Usage older than Stripe's 35-day window for meter events: Stripe can no longer take it.
    TooOldForStripe,
    /// The bucket lies before the subscription's current billing period (legacy usage records),
    /// or in a billing period whose invoice Stripe finalized (meters mode).
    PeriodClosed,
    /// Settled pushes that Stripe does not hold (dropped after acceptance, or a Stripe account
    /// that lost them): `--apply --repair-missing` pushes the amount again.
    StripeMissing,
    /// Stripe holds more than the ledger says was pushed (another system, or a correction not cancellable).
    StripeAhead,
    NeedsCredit,
    Unmapped,
    /// An intent too old to be resent safely: check Stripe by hand (docs/invoicing.md).
    Unresolved,
    /// Stripe refused the bucket's last write: fix the cause, then `--retry-failed`.
    Failed,
    /// A total of the bucket's (org, meter) needs more than 64 bits (PRODUCT.md §1): nothing is
    /// written for the pair until the events behind it are looked at. Other pairs go on.
    TotalOverflow,
}

impl Status {
    /// Whether the bucket is reconciled.
    pub fn settled(self) -> bool {
        matches!(self, Status::Ok | Status::StripeLagging)
    }

    /// Errors make the run exit 1; other unsettled statuses exit 2.
    pub fn is_error(self) -> bool {
        matches!(self, Status::Failed | Status::Unresolved | Status::TotalOverflow)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::StripeLagging => "stripe_lagging",
            Status::Push => "push",
            Status::Correct => "correct",
            Status::Repair => "repair",
            Status::Pending => "pending",
            Status::Future => "future",
            Status::TooOldForStripe => "too_old_for_stripe",
            Status::PeriodClosed => "period_closed",
            Status::StripeMissing => "stripe_missing",
            Status::StripeAhead => "stripe_ahead",
            Status::NeedsCredit => "needs_credit",
            Status::Unmapped => "unmapped",
            Status::Unresolved => "unresolved",
            Status::Failed => "failed",
            Status::TotalOverflow => "total_overflow",
        }
    }
}

/// Why Stripe refused a write, as far as it decides what becomes of the bucket. Stored as the
/// prefix of the `failed` ledger row's detail (`period_closed: <Stripe's message>`), so that a
/// refusal that cannot succeed on retry is never sent again as a new push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A usage record before the subscription's current billing period (legacy mode).
    PeriodClosed,
    /// A meter event outside Stripe's 35-day window.
    TooOld,
    /// Anything else (unknown customer, inactive meter, ...): a person fixes the cause and runs
    /// `reconcile --apply --retry-failed`.
    Other,
}

impl Refusal {
    /// Classifies a definitive refusal of a write whose timestamp was `event_ts`. Stripe names the
    /// refused parameter in `error.param`: `timestamp` for both time rules.
    ///
    /// Only a timestamp in the past is closed for good: a refused future timestamp (clock skew)
    /// may succeed later, and meter events are too old only beyond the 35-day window (less the
    /// planning margin).
    pub fn classify(legacy: bool, event_ts: i64, now: i64, param: Option<&str>) -> Refusal {
        match param {
            Some("timestamp") if legacy && event_ts < now - MAX_FUTURE_SECS => Refusal::PeriodClosed,
            Some("timestamp") if !legacy && event_ts < now - MAX_EVENT_AGE_SECS + AGE_MARGIN_SECS => Refusal::TooOld,
            _ => Refusal::Other,
        }
    }

    pub fn prefix(self) -> &'static str {
        match self {
            Refusal::PeriodClosed => "period_closed",
            Refusal::TooOld => "too_old_for_stripe",
            Refusal::Other => "refused",
        }
    }

    /// The class recorded in a `failed` row's detail.
    pub fn of_detail(detail: &str) -> Refusal {
        match detail.split_once(':').map(|(p, _)| p) {
            Some("period_closed") => Refusal::PeriodClosed,
            Some("too_old_for_stripe") => Refusal::TooOld,
            _ => Refusal::Other,
        }
    }
}

/// The decision for one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    pub status: Status,
    /// What the ledger says Stripe holds (done writes; 0 while a bucket has pending ones).
    pub ledger: u64,
    /// Over-reported amount that needs a credit note.
    pub needs_credit: u64,
    /// Under-billed amount Stripe does not hold and will not get without action: lost by Stripe
    /// (`stripe_missing`), or no longer accepted (`period_closed`, `too_old_for_stripe`), or
    /// refused (`failed`).
    pub unbilled: u64,
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
    /// Seconds after a bucket's last write before Stripe must show it (`stripe.settle_secs`).
    pub settle_secs: i64,
    /// Plan pushes of what Stripe lost (`--repair-missing`).
    pub repair_missing: bool,
    /// Plan a bucket again although Stripe refused its last write (`--retry-failed`).
    pub retry_failed: bool,
    /// Meters mode: how far a write's ledger times must be from Stripe's finalization of its
    /// invoice to judge it on time or late ([`Landing`]; `stripe.landing_tolerance_secs`).
    pub landing_tolerance_secs: i64,
}

impl BucketPlan {
    fn status(status: Status, ledger: u64, note: impl Into<String>) -> Self {
        BucketPlan { status, ledger, needs_credit: 0, unbilled: 0, actions: Vec::new(), note: note.into() }
    }

    fn unbilled(status: Status, ledger: u64, amount: u64, note: impl Into<String>) -> Self {
        BucketPlan { unbilled: amount, ..BucketPlan::status(status, ledger, note) }
    }

    /// A bucket of a pair whose total needs more than 64 bits: nothing planned, what the ledger
    /// holds reported.
    fn refused(b: &Bucket, why: &str) -> Self {
        BucketPlan::status(Status::TotalOverflow, ledger_of(b), why)
    }
}

/// Meters mode: where a done write stands with the invoice of the billing period its timestamp
/// falls in. Stripe bills a meter event on a subscription's cycle invoice only if it arrived
/// before the invoice was finalized; it accepts later ones for 35 days, and counts them in the
/// meter's summaries, but bills them nowhere. The ledger bounds when a write arrived: after its
/// intent (`intent_at`), before its answer (`done_at`), both on the invoicer's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// Its timestamp is in a period no invoice has closed (or legacy mode).
    Open,
    /// Answered before the finalization (or the invoice is a draft inside the margin): billed.
    OnTime,
    /// Intent recorded after the finalization: billed by no invoice.
    Late,
    /// Sent before the finalization and answered after it (an earlier run's pending write resent
    /// after it, or a slow request): only the invoice's lines can tell.
    Uncertain,
}

impl Landing {
    /// `p`'s landing for bucket `b` (meters mode): on time only if answered `tolerance` seconds
    /// before the finalization, late only if its intent is `tolerance` seconds after it (the
    /// invoicer's clock against Stripe's; and Stripe processes meter events asynchronously).
    pub fn of(b: &Bucket, p: &Push, tolerance: i64) -> Landing {
        let ts = p.entry.event_ts;
        if b.open_from.is_none_or(|open| ts >= open) {
            return Landing::Open;
        }
        match period_of(&b.finals, ts).and_then(|f| f.finalized_at) {
            None => Landing::OnTime,
            Some(f) => match p.done_at {
                Some(d) if d < f - tolerance => Landing::OnTime,
                _ if p.intent_at > f + tolerance => Landing::Late,
                _ => Landing::Uncertain,
            },
        }
    }
}

/// Plans one bucket.
pub fn plan(ctx: &Ctx, b: &Bucket) -> BucketPlan {
    plan_bucket(ctx, b, false)
}

/// [`plan`]; `judged`: the bucket's tally was already shifted by its late writes (below).
fn plan_bucket(ctx: &Ctx, b: &Bucket, judged: bool) -> BucketPlan {
    let Some(t) = &b.target else {
        if let Some(why) = &b.overflow {
            return BucketPlan::refused(b, why);
        }
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
    // After the pending checks: a write an earlier run left without an answer is still resent as
    // it was (it completes that run's decision); nothing new is planned for a refused pair.
    if let Some(why) = &b.overflow {
        return BucketPlan::refused(b, why);
    }
    let next_seq = b.pushes.iter().map(|p| p.entry.seq).max().unwrap_or(0) + 1;
    let entry = |action: Action, seq: u32, value: u64, cancels: &str, event_ts: i64, reason: String| Entry {
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
        reason,
    };
    let done = |p: &&&Push| p.outcome == Outcome::Done;
    let oldest_allowed = ctx.now - MAX_EVENT_AGE_SECS + AGE_MARGIN_SECS;
    // Stripe's refusal of the bucket's last write decides the bucket until it is retried: a
    // refusal that cannot succeed is reported with its amount, never sent again as a new push.
    let refused =
        b.pushes.iter().filter(|p| p.entry.action != Action::Cancel).max_by_key(|p| p.entry.seq).and_then(|p| match &p
            .outcome
        {
            Outcome::Failed(d) => Some((Refusal::of_detail(d), d.as_str())),
            _ => None,
        });
    let blocked = |ledger: u64, amount: u64| -> Option<BucketPlan> {
        let (r, detail) = refused?;
        match r {
            Refusal::PeriodClosed => Some(BucketPlan::unbilled(
                Status::PeriodClosed,
                ledger,
                amount,
                "Stripe refused: billing period closed",
            )),
            Refusal::TooOld => Some(BucketPlan::unbilled(
                Status::TooOldForStripe,
                ledger,
                amount,
                "Stripe refused: older than 35 days",
            )),
            Refusal::Other if ctx.retry_failed => None,
            Refusal::Other => Some(BucketPlan::unbilled(
                Status::Failed,
                ledger,
                amount,
                format!("{detail} (fix the cause, then reconcile --apply --retry-failed)"),
            )),
        }
    };
    // Stripe's time rules for a write at `ts`: legacy usage records only inside the current
    // billing period; meter events within 35 days, and billed only before the invoice of their
    // period is finalized.
    let meters_mode = ctx.can_cancel;
    let closed = |ts: i64, ledger: u64, amount: u64| -> Option<BucketPlan> {
        match b.open_from {
            Some(open) if ts < open => Some(BucketPlan::unbilled(
                Status::PeriodClosed,
                ledger,
                amount,
                if meters_mode {
                    format!(
                        "Stripe finalized the invoice for usage before {}: a meter event would not be billed",
                        crate::timestamp::format_rfc3339(open)
                    )
                } else {
                    format!(
                        "the subscription's billing period now starts at {}",
                        crate::timestamp::format_rfc3339(open)
                    )
                },
            )),
            Some(_) if !meters_mode => None,
            _ if ts < oldest_allowed => {
                Some(BucketPlan::unbilled(Status::TooOldForStripe, ledger, amount, "older than Stripe's 35 days"))
            }
            _ => None,
        }
    };
    let last_done = |f: &dyn Fn(Action) -> bool| -> Option<i64> {
        b.pushes.iter().filter(done).filter(|p| f(p.entry.action)).filter_map(|p| p.done_at).max()
    };
    let settle = Settle {
        now: ctx.now,
        secs: ctx.settle_secs,
        last_add: last_done(&|a| a != Action::Cancel),
        last_cancel: last_done(&|a| a == Action::Cancel),
    };
    // Meters mode: the writes of closed periods that landed after Stripe finalized the invoice.
    let landings: Vec<(&Push, Landing)> = if meters_mode && !judged {
        let tolerance = ctx.landing_tolerance_secs;
        b.pushes
            .iter()
            .filter(done)
            .map(|p| (*p, Landing::of(b, p, tolerance)))
            .filter(|(_, l)| *l != Landing::Open)
            .collect()
    } else {
        Vec::new()
    };
    if let Some((p, _)) = landings.iter().find(|(_, l)| *l == Landing::Uncertain) {
        return BucketPlan::status(
            Status::Unresolved,
            ledger_of(b),
            format!(
                "write {} was sent before Stripe finalized the invoice of its period and answered after it: the \
                 invoice's lines say whether it is billed; record when it landed by hand (docs/invoicing.md)",
                p.entry.push_id
            ),
        );
    }
    let late: Vec<&Push> = landings.iter().filter(|(_, l)| *l == Landing::Late).map(|(p, _)| *p).collect();
    let is_late = |p: &Push| late.iter().any(|q| std::ptr::eq(*q, p));
    let late_note = |billed: u64| {
        format!(
            "{} write(s) landed after Stripe finalized the invoice of their period (first {}): billed by no \
             invoice; billed {billed}",
            late.len(),
            late[0].entry.push_id
        )
    };

    if b.unique {
        let last = last_set(b);
        let ledger = last.map_or(0, |p| p.entry.value);
        // The last value set landed after the finalization: the invoice billed the last one before.
        if last.is_some_and(|p| is_late(p)) {
            let billed = b
                .pushes
                .iter()
                .filter(done)
                .filter(|p| p.entry.action == Action::Set && !is_late(p))
                .max_by_key(|p| p.entry.seq)
                .map_or(0, |p| p.entry.value);
            return billed_on_final_invoice(b.tally, ledger, billed, late_note(billed));
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
        let (value, reason, status) = if b.tally == ledger {
            let c = compare(b, ledger, &settle);
            if c.status != Status::StripeMissing {
                return c;
            }
            let why = format!(
                "repair: Stripe's last value {} != the ledger's {ledger} after the settle time",
                b.stripe.unwrap_or(0)
            );
            // As for additive meters: a value Stripe lost in a closed period cannot be set again.
            if let Some(p) = blocked(ledger, c.unbilled).or_else(|| closed(ts, ledger, c.unbilled)) {
                return BucketPlan { note: format!("Stripe lost the value {ledger}; {}", p.note), ..p };
            }
            if !ctx.repair_missing {
                return c;
            }
            let repaired_before = b
                .pushes
                .iter()
                .filter(done)
                .any(|p| p.entry.action == Action::Set && p.entry.reason.starts_with("repair:"));
            if repaired_before && !ctx.retry_failed {
                return BucketPlan { note: format!("{}; {LOST_AGAIN}", c.note), ..c };
            }
            (ledger, why, Status::Repair)
        } else {
            (b.tally, String::new(), Status::Push)
        };
        let amount = value.saturating_sub(b.stripe.unwrap_or(ledger).min(ledger));
        if let Some(p) = blocked(ledger, amount).or_else(|| closed(ts, ledger, amount)) {
            // A lower value for a period whose invoice is final: the invoice billed the higher one.
            if p.status == Status::PeriodClosed && meters_mode && value < ledger {
                let mut credit = BucketPlan::status(
                    Status::NeedsCredit,
                    ledger,
                    "over-reported; the value is on an invoice Stripe finalized",
                );
                credit.needs_credit = ledger - value;
                return credit;
            }
            return p;
        }
        if ts >= b.end || ts > ctx.now + MAX_FUTURE_SECS {
            return BucketPlan::status(Status::Future, ledger, "no later timestamp left for a new value");
        }
        let mut p = BucketPlan::status(status, ledger, "");
        if status == Status::Repair {
            p.unbilled = amount;
            p.note = format!("set the last value {value} Stripe lost again");
        }
        p.actions.push(entry(Action::Set, next_seq, value, "", ts, reason));
        return p;
    }

    let refused_cancels: Vec<&str> = b
        .pushes
        .iter()
        .filter(|p| matches!(p.outcome, Outcome::Failed(_)) && p.entry.action == Action::Cancel)
        .map(|p| p.entry.cancels.as_str())
        .collect();
    let live: Vec<&&Push> = live_pushes(b).collect();
    let ledger: u64 = live.iter().map(|p| p.entry.value).sum();
    // A bucket is written at its first second, or at the earliest second Stripe still accepts.
    // Legacy: a bucket that straddles the current period's start is written at that start.
    let ts = match b.open_from {
        Some(open) if !meters_mode => b.start.max(open),
        Some(open) => b.start.max(open).max(oldest_allowed),
        None => b.start.max(oldest_allowed),
    };
    if !late.is_empty() {
        // What the invoices bill: the writes that are not late (a cancel that lands late leaves
        // its push billed), less the repairs that landed late (the loss they make up stays
        // unbilled).
        let billed: i128 = b
            .pushes
            .iter()
            .filter(done)
            .map(|p| {
                let v = i128::from(p.entry.value);
                match (p.entry.action, is_late(p)) {
                    (Action::Repair, true) => -v,
                    (Action::Repair, false) | (_, true) => 0,
                    (Action::Cancel, false) => -v,
                    (_, false) => v,
                }
            })
            .sum();
        // The late writes are dead weight in the ledger: Stripe holds them, no invoice bills
        // them. The bucket is planned as usual with tally raised by that weight, so that every
        // rule (Stripe's drops, repairs, cancels of pushes after the period's end, the closed
        // period's reports) measures what is billed against tally.
        let shifted = i128::from(b.tally) + i128::from(ledger) - billed.max(0);
        let Ok(shifted) = u64::try_from(shifted) else {
            // Late cancels left more billed than the ledger and tally together.
            let billed = u64::try_from(billed).unwrap_or(u64::MAX);
            return billed_on_final_invoice(b.tally, ledger, billed, late_note(billed));
        };
        let p = plan_bucket(ctx, &Bucket { tally: shifted, ..b.clone() }, true);
        let billed = u64::try_from(billed.max(0)).unwrap_or(u64::MAX);
        let note = if p.note.is_empty() { late_note(billed) } else { format!("{}; {}", late_note(billed), p.note) };
        return BucketPlan { note, ..p };
    }
    if b.tally == ledger {
        let c = compare(b, ledger, &settle);
        if c.status != Status::StripeMissing {
            return c;
        }
        let missing = c.unbilled;
        if let Some(p) = blocked(ledger, missing).or_else(|| closed(ts.min(b.end - 1), ledger, missing)) {
            return BucketPlan { note: format!("Stripe lost {missing} of {ledger}; {}", p.note), ..p };
        }
        if !ctx.repair_missing {
            return c;
        }
        let repaired_before = b.pushes.iter().filter(done).any(|p| p.entry.action == Action::Repair);
        if repaired_before && !ctx.retry_failed {
            // Stripe lost a repair too: the cause (customer, meter) is still there.
            return BucketPlan { note: format!("{}; {LOST_AGAIN}", c.note), ..c };
        }
        let why =
            format!("repair: Stripe held {} of the ledger's {ledger} after the settle time", b.stripe.unwrap_or(0));
        let mut p = BucketPlan::unbilled(Status::Repair, ledger, missing, format!("push the {missing} Stripe lost"));
        p.actions.push(entry(Action::Repair, next_seq, missing, "", ts, why));
        return p;
    }
    if b.tally > ledger {
        let amount = b.tally - ledger;
        if let Some(p) = blocked(ledger, amount).or_else(|| closed(ts.min(b.end - 1), ledger, amount)) {
            return p;
        }
        if ts > ctx.now + MAX_FUTURE_SECS {
            return BucketPlan::status(Status::Future, ledger, "bucket starts in the future");
        }
        let mut p = BucketPlan::status(Status::Push, ledger, "");
        p.actions.push(entry(Action::Push, next_seq, amount, "", ts, String::new()));
        return p;
    }
    // Over-report: the ledger holds more than tally. A meter event of a period whose invoice is
    // final is billed: cancelling it changes no invoice, so it takes a credit.
    let invoiced = |p: &Push| meters_mode && b.open_from.is_some_and(|open| p.entry.event_ts < open);
    let cancellable: Vec<&&&Push> = live
        .iter()
        .filter(|p| {
            ctx.can_cancel
                && !refused_cancels.contains(&p.entry.push_id.as_str())
                && p.done_at.is_some_and(|d| ctx.now - d < CANCEL_WINDOW_SECS)
                && !invoiced(p)
        })
        .collect();
    let c: u64 = cancellable.iter().map(|p| p.entry.value).sum();
    // Every write on a final invoice: the invoice billed what Stripe held, which may be less than
    // the ledger (events Stripe dropped).
    if meters_mode && !live.is_empty() && live.iter().all(|p| invoiced(p)) {
        let billed = b.stripe.map_or(ledger, |s| s.min(ledger));
        if billed < b.tally {
            let amount = b.tally - billed;
            return BucketPlan::unbilled(
                Status::PeriodClosed,
                ledger,
                amount,
                format!("over-reported by the ledger, but Stripe billed {billed}: {amount} not billed; the invoice is final"),
            );
        }
        if billed == b.tally {
            return BucketPlan::status(Status::Ok, ledger, format!("Stripe billed {billed} on a final invoice"));
        }
        let mut p = BucketPlan::status(
            Status::NeedsCredit,
            ledger,
            format!("over-reported; Stripe billed {billed} on an invoice it finalized"),
        );
        p.needs_credit = billed - b.tally;
        return p;
    }
    if ledger - c > b.tally {
        let mut p = BucketPlan::status(
            Status::NeedsCredit,
            ledger,
            "over-reported; pushes too old to cancel, or on an invoice Stripe finalized",
        );
        p.needs_credit = ledger - b.tally;
        return p;
    }
    let mut p = BucketPlan::status(
        Status::Correct,
        ledger,
        format!("cancel {} push(es), then push {}", cancellable.len(), b.tally - (ledger - c)),
    );
    for (i, q) in cancellable.iter().enumerate() {
        p.actions.push(entry(
            Action::Cancel,
            next_seq + i as u32,
            q.entry.value,
            &q.entry.push_id,
            q.entry.event_ts,
            String::new(),
        ));
    }
    p
}

/// A bucket whose invoice is final, against what the invoice billed: `period_closed` for usage it
/// did not bill, `needs_credit` for what it billed beyond tally, `ok` when they agree.
fn billed_on_final_invoice(tally: u64, ledger: u64, billed: u64, note: String) -> BucketPlan {
    match tally.cmp(&billed) {
        std::cmp::Ordering::Greater => BucketPlan::unbilled(
            Status::PeriodClosed,
            ledger,
            tally - billed,
            format!("{note}: {} not billed; the invoice is final", tally - billed),
        ),
        std::cmp::Ordering::Equal => BucketPlan::status(Status::Ok, ledger, note),
        std::cmp::Ordering::Less => {
            let mut p = BucketPlan::status(Status::NeedsCredit, ledger, format!("{note}: over-reported"));
            p.needs_credit = billed - tally;
            p
        }
    }
}

/// What the ledger says Stripe holds for the bucket: a unique meter's last value, or the sum of
/// the live pushes.
fn ledger_of(b: &Bucket) -> u64 {
    if b.unique {
        last_set(b).map_or(0, |p| p.entry.value)
    } else {
        live_pushes(b).map(|p| p.entry.value).sum()
    }
}

/// A unique meter's bucket: its last done `set`, whose value the ledger says Stripe holds.
fn last_set<'a, 'b>(b: &'b Bucket<'a>) -> Option<&'b &'a Push> {
    b.pushes.iter().filter(|p| p.outcome == Outcome::Done && p.entry.action == Action::Set).max_by_key(|p| p.entry.seq)
}

/// An additive meter's bucket: its done pushes that no done cancel undid; their sum is what the
/// ledger says Stripe holds.
fn live_pushes<'a, 'b>(b: &'b Bucket<'a>) -> impl Iterator<Item = &'b &'a Push> {
    let cancelled: Vec<&str> = b
        .pushes
        .iter()
        .filter(|p| p.outcome == Outcome::Done && p.entry.action == Action::Cancel)
        .map(|p| p.entry.cancels.as_str())
        .collect();
    b.pushes.iter().filter(move |p| {
        p.outcome == Outcome::Done && p.entry.action == Action::Push && !cancelled.contains(&p.entry.push_id.as_str())
    })
}

/// Legacy mode: Stripe's figures are per subscription item and billing period (usage record
/// summaries), not per bucket, so the ledger is compared with them period by period.
pub struct Item<'a> {
    pub org_id: String,
    pub meter: String,
    pub target: Target,
    pub unique: bool,
    /// Stripe's usage record summaries: (period start, period end, total usage).
    pub periods: Vec<(i64, i64, u64)>,
    /// The subscription's current billing period.
    pub current: (i64, i64),
    /// The ledger's writes of this (org, meter) over every period compared.
    pub pushes: Vec<&'a Push>,
    /// The reconciled period and bucket size: a repair goes into one of its buckets.
    pub period: (i64, i64),
    pub bucket_secs: i64,
}

/// The outcome of comparing one billing period of a subscription item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemCheck {
    pub org_id: String,
    pub meter: String,
    /// The billing period compared ([`Item::period`] for writes outside every period Stripe lists).
    pub start: i64,
    pub end: i64,
    pub stripe: u64,
    pub plan: BucketPlan,
}

/// Compares the ledger with Stripe's usage record summaries, billing period by billing period,
/// with the same time bound as [`compare`]: settled writes Stripe does not show are
/// `stripe_missing` in the current period (repaired by an increment, or a `set` again, with
/// `--repair-missing`) and `period_closed` in a closed one; Stripe showing more is `stripe_ahead`.
/// Returns the periods that are not `ok`.
pub fn check_item(ctx: &Ctx, item: &Item) -> Vec<ItemCheck> {
    let writes: Vec<&&Push> = item
        .pushes
        .iter()
        .filter(|p| p.outcome == Outcome::Done && matches!(p.entry.action, Action::Push | Action::Set | Action::Repair))
        .collect();
    // Which period a timestamp falls in: one Stripe lists, the current one, or none (`None`).
    let period_of = |ts: i64| -> Option<(i64, i64)> {
        item.periods.iter().map(|(s, e, _)| (*s, *e)).chain([item.current]).find(|(s, e)| *s <= ts && ts < *e)
    };
    let mut groups: BTreeMap<Option<(i64, i64)>, Vec<&&Push>> = BTreeMap::new();
    for p in &writes {
        groups.entry(period_of(p.entry.event_ts)).or_default().push(p);
    }
    for (s, e, total) in &item.periods {
        if *total > 0 && *s < item.period.1 && *e > item.period.0 {
            groups.entry(Some((*s, *e))).or_default();
        }
    }
    // Only the periods that overlap the reconciled one: the ledger was read over all of them, so
    // their writes are complete (a period beyond them would be judged from part of its writes).
    let (pf, pt) = item.period;
    let mut out = Vec::new();
    for (group, mut ps) in groups {
        match group {
            Some((s, e)) if !(s < pt && e > pf) => continue,
            None => ps.retain(|p| (pf..pt).contains(&p.entry.event_ts)),
            Some(_) => {}
        }
        // What Stripe should hold: every increment pushed (repairs replace lost ones), and per
        // timestamp the latest value set.
        let mut sets: BTreeMap<i64, (u32, u64)> = BTreeMap::new();
        let mut ledger = 0u64;
        for p in &ps {
            match p.entry.action {
                Action::Push => ledger += p.entry.value,
                Action::Set => {
                    let slot = sets.entry(p.entry.event_ts).or_insert((p.entry.seq, p.entry.value));
                    if p.entry.seq >= slot.0 {
                        *slot = (p.entry.seq, p.entry.value);
                    }
                }
                _ => {}
            }
        }
        ledger += sets.values().map(|(_, v)| v).sum::<u64>();
        let stripe =
            group.and_then(|(s, e)| item.periods.iter().find(|p| (p.0, p.1) == (s, e)).map(|p| p.2)).unwrap_or(0);
        if stripe == ledger {
            continue;
        }
        let settle = Settle {
            now: ctx.now,
            secs: ctx.settle_secs,
            last_add: ps.iter().filter_map(|p| p.done_at).max(),
            last_cancel: None,
        };
        // Increments can only be behind: Stripe is judged against the settled ones alone, so
        // that a period written every hour still shows a loss (a lower bound of it) while open.
        let settled: u64 = ps
            .iter()
            .filter(|p| p.entry.action == Action::Push && p.done_at.is_some_and(|d| !settle.recent(Some(d))))
            .map(|p| p.entry.value)
            .sum();
        let lagging = if item.unique { settle.recent(settle.last_add) } else { stripe < ledger && stripe >= settled };
        let missing = if item.unique { ledger.saturating_sub(stripe) } else { settled.saturating_sub(stripe) };
        let (start, end) = group.unwrap_or(item.period);
        let when = |t: i64| crate::timestamp::format_rfc3339(t);
        let plan = if lagging {
            BucketPlan::status(Status::StripeLagging, ledger, "Stripe's summary has not caught up")
        } else if stripe > ledger {
            BucketPlan {
                needs_credit: stripe - ledger,
                ..BucketPlan::status(
                    Status::StripeAhead,
                    ledger,
                    format!("Stripe's usage for the billing period holds {stripe}, tally pushed {ledger}"),
                )
            }
        } else if group != Some(item.current) {
            BucketPlan::unbilled(
                Status::PeriodClosed,
                ledger,
                missing,
                match group {
                    Some((s, e)) => format!(
                        "Stripe's usage for the closed billing period {}..{} holds {stripe} of the {ledger} pushed",
                        when(s),
                        when(e)
                    ),
                    None => format!("{ledger} pushed at times outside every billing period Stripe lists"),
                },
            )
        } else {
            let mut plan = BucketPlan::unbilled(
                Status::StripeMissing,
                ledger,
                missing,
                format!("Stripe's usage for the current billing period holds {stripe} of the {ledger} pushed (settled); reconcile --apply --repair-missing"),
            );
            // A repair Stripe refused, or lost too, is not sent again without a person.
            let tried = item.pushes.iter().any(|p| {
                p.entry.reason.starts_with("repair:")
                    && p.outcome != Outcome::Pending
                    && (start..end).contains(&p.entry.event_ts)
            }) || ps.iter().any(|p| p.entry.action == Action::Repair);
            if tried && !ctx.retry_failed {
                plan.note = format!(
                    "{}; an earlier repair was refused or lost too: fix the cause, then --repair-missing --retry-failed",
                    plan.note
                );
            } else if ctx.repair_missing {
                plan = repair_item(ctx, item, &ps, &sets, stripe, missing, plan);
            }
            plan
        };
        out.push(ItemCheck { org_id: item.org_id.clone(), meter: item.meter.clone(), start, end, stripe, plan });
    }
    out
}

/// The write that gives Stripe back what it lost in the current billing period: an increment of
/// the missing amount at the latest write's timestamp, or the latest value `set` again at its
/// own timestamp. It goes into the bucket of that timestamp, which must lie in the reconciled period.
fn repair_item(
    ctx: &Ctx,
    item: &Item,
    ps: &[&&Push],
    sets: &BTreeMap<i64, (u32, u64)>,
    stripe: u64,
    missing: u64,
    missing_plan: BucketPlan,
) -> BucketPlan {
    let Some(latest) = ps.iter().max_by_key(|p| (p.entry.event_ts, p.entry.seq)) else { return missing_plan };
    let ts = latest.entry.event_ts;
    let (bs, be) = if item.unique {
        (latest.entry.bucket_start, latest.entry.bucket_end)
    } else {
        let b = ts - ts.rem_euclid(item.bucket_secs);
        (b, b + item.bucket_secs)
    };
    if bs < item.period.0 || be > item.period.1 {
        return BucketPlan {
            note: format!(
                "{}; the repair belongs to {}..{}: reconcile that period with --repair-missing",
                missing_plan.note,
                crate::timestamp::format_rfc3339(bs),
                crate::timestamp::format_rfc3339(be)
            ),
            ..missing_plan
        };
    }
    let seq = item
        .pushes
        .iter()
        .filter(|p| (p.entry.bucket_start, p.entry.bucket_end) == (bs, be))
        .map(|p| p.entry.seq)
        .max()
        .unwrap_or(0)
        + 1;
    // An increment of the missing amount; or every value of the period set again (a set is
    // idempotent per timestamp, and which one Stripe lost is unknown).
    let writes: Vec<(Action, u64, i64)> = if item.unique {
        sets.iter().map(|(t, (_, v))| (Action::Set, *v, *t)).collect()
    } else {
        vec![(Action::Repair, missing, ts)]
    };
    let t = &item.target;
    let actions = writes
        .into_iter()
        .enumerate()
        .map(|(i, (action, value, event_ts))| {
            let seq = seq + i as u32;
            Entry {
                push_id: push_id(ctx.mode, ctx.account, action, &t.customer, &t.target, bs, be, seq),
                action,
                org_id: item.org_id.clone(),
                customer: t.customer.clone(),
                meter: item.meter.clone(),
                target: t.target.clone(),
                event_name: t.event_name.clone(),
                bucket_start: bs,
                bucket_end: be,
                seq,
                value,
                cancels: String::new(),
                event_ts,
                reason: format!(
                    "repair: Stripe's usage for the current billing period held {stripe}, {missing} short of the settled pushes"
                ),
            }
        })
        .collect();
    BucketPlan { status: Status::Repair, note: format!("push the {missing} Stripe lost"), actions, ..missing_plan }
}

/// When the bucket was last written to, for telling Stripe's lag from Stripe's loss.
struct Settle {
    now: i64,
    secs: i64,
    /// Latest done push, set or repair.
    last_add: Option<i64>,
    /// Latest done cancel.
    last_cancel: Option<i64>,
}

impl Settle {
    fn recent(&self, t: Option<i64>) -> bool {
        t.is_some_and(|t| self.now - t < self.secs)
    }
}

/// tally and the ledger agree: compare with Stripe's own figure where there is one. Within the
/// settle time of the write that moved the ledger, a difference is Stripe's lag; after it, it is
/// drift, whichever way it goes.
fn compare(b: &Bucket, ledger: u64, settle: &Settle) -> BucketPlan {
    match b.stripe {
        Some(s) if s > ledger => {
            // A cancel (or, for `last` meters, a newer lower value) not visible yet.
            if settle.recent(settle.last_cancel) || (b.unique && settle.recent(settle.last_add)) {
                return BucketPlan::status(Status::StripeLagging, ledger, "Stripe's summary has not caught up");
            }
            let mut p = BucketPlan::status(Status::StripeAhead, ledger, "Stripe holds usage tally did not push");
            p.needs_credit = s - b.tally.min(s);
            p
        }
        Some(s) if s < ledger => {
            if settle.recent(settle.last_add) {
                return BucketPlan::status(Status::StripeLagging, ledger, "Stripe's summary has not caught up");
            }
            BucketPlan::unbilled(
                Status::StripeMissing,
                ledger,
                ledger - s,
                format!("Stripe holds {s} of the {ledger} pushed (settled); reconcile --apply --repair-missing"),
            )
        }
        _ => BucketPlan::status(Status::Ok, ledger, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoice::ledger::Push;
    use crate::invoice::stripe::invoices::FinalPeriod;

    const NOW: i64 = 1_800_000_000 + 1800; // 1_800_000_000 is a whole hour
    const H: i64 = NOW - 1800 - 3 * 3600;

    fn ctx() -> Ctx<'static> {
        Ctx {
            mode: "meters",
            account: "",
            now: NOW,
            can_cancel: true,
            settle_secs: 7200,
            repair_missing: false,
            retry_failed: false,
            landing_tolerance_secs: 0,
        }
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
            open_from: None,
            finals: Vec::new(),
            pushes,
            overflow: None,
        }
    }

    fn done(entry: Entry, at: i64) -> Push {
        Push { entry, outcome: Outcome::Done, intent_at: at, done_at: Some(at), run_id: "r".into() }
    }

    fn failed(entry: Entry, detail: &str) -> Push {
        Push { entry, outcome: Outcome::Failed(detail.into()), intent_at: NOW, done_at: None, run_id: "r".into() }
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
        let pending =
            Push { entry: e, outcome: Outcome::Pending, intent_at: NOW - 60, done_at: None, run_id: "r".into() };
        assert_eq!(plan(&ctx(), &bucket(10, vec![&pending])).status, Status::Pending);
        let stale = Push { intent_at: NOW - 24 * 3600, ..pending.clone() };
        assert_eq!(plan(&ctx(), &bucket(10, vec![&stale])).status, Status::Unresolved);
    }

    #[test]
    fn refused_writes_count_for_nothing_and_are_not_sent_again_unasked() {
        let e = plan(&ctx(), &bucket(10, vec![])).actions[0].clone();
        let refused =
            failed(e.clone(), "refused: stripe 404 invalid_request_error (resource_missing): No such customer");
        let p = plan(&ctx(), &bucket(10, vec![&refused]));
        assert_eq!((p.status, p.ledger, p.unbilled, p.actions.len()), (Status::Failed, 0, 10, 0));
        assert!(p.note.contains("No such customer") && p.note.contains("--retry-failed"), "{}", p.note);
        let retry = Ctx { retry_failed: true, ..ctx() };
        let p = plan(&retry, &bucket(10, vec![&refused]));
        assert_eq!((p.status, p.ledger, p.actions[0].value, p.actions[0].seq), (Status::Push, 0, 10, 2));
        // Refusals that cannot succeed on retry keep their own status, even with --retry-failed.
        for (detail, status) in [
            ("period_closed: stripe 400 ...", Status::PeriodClosed),
            ("too_old_for_stripe: stripe 400 ...", Status::TooOldForStripe),
        ] {
            let r = failed(e.clone(), detail);
            let p = plan(&retry, &bucket(12, vec![&r]));
            assert_eq!((p.status, p.unbilled, p.actions.len()), (status, 12, 0), "{detail}");
        }
        assert_eq!(Refusal::classify(true, NOW - 3600, NOW, Some("timestamp")), Refusal::PeriodClosed);
        assert_eq!(Refusal::classify(false, NOW - 40 * 86_400, NOW, Some("timestamp")), Refusal::TooOld);
        assert_eq!(Refusal::classify(false, NOW - 10, NOW, Some("payload")), Refusal::Other);
        // A refused timestamp that is not in the past (clock skew) may succeed later.
        assert_eq!(Refusal::classify(true, NOW + 600, NOW, Some("timestamp")), Refusal::Other);
        assert_eq!(Refusal::classify(false, NOW - 3600, NOW, Some("timestamp")), Refusal::Other);
        for r in [Refusal::PeriodClosed, Refusal::TooOld, Refusal::Other] {
            assert_eq!(Refusal::of_detail(&format!("{}: x: y", r.prefix())), r);
        }
    }

    #[test]
    fn stripe_below_the_ledger_is_lag_within_the_settle_time_and_missing_after() {
        let e = plan(&ctx(), &bucket(10, vec![])).actions[0].clone();
        let fresh = done(e.clone(), NOW - 7199);
        let mut b = bucket(10, vec![&fresh]);
        b.stripe = Some(4);
        assert_eq!(plan(&ctx(), &b).status, Status::StripeLagging);
        let settled = done(e.clone(), NOW - 7200);
        b.pushes = vec![&settled];
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.unbilled, p.actions.len()), (Status::StripeMissing, 6, 0));
        b.stripe = None; // Stripe holds nothing at all for the bucket
        b.stripe = Some(0);
        assert_eq!((plan(&ctx(), &b).status, plan(&ctx(), &b).unbilled), (Status::StripeMissing, 10));
        b.stripe = Some(4);
        // --repair-missing pushes exactly the missing amount under a new deterministic id.
        let repair = Ctx { repair_missing: true, ..ctx() };
        let p = plan(&repair, &b);
        assert_eq!(p.status, Status::Repair);
        let a = &p.actions[0];
        assert_eq!((a.action, a.value, a.seq, a.event_ts), (Action::Repair, 6, 2, H));
        assert!(a.reason.starts_with("repair: Stripe held 4 of the ledger's 10"), "{}", a.reason);
        assert_eq!(plan(&repair, &b).actions, p.actions, "rerun-safe: the same id");
        // The repair does not change the ledger's value; Stripe's lag after it is lag again.
        let r = done(a.clone(), NOW - 60);
        b.pushes = vec![&settled, &r];
        assert_eq!((plan(&repair, &b).status, plan(&repair, &b).ledger), (Status::StripeLagging, 10));
        // Lost again after the repair settled: a person looks first (--retry-failed to repair again).
        let r_settled = done(a.clone(), NOW - 7200);
        b.pushes = vec![&settled, &r_settled];
        let p = plan(&repair, &b);
        assert_eq!((p.status, p.actions.len()), (Status::StripeMissing, 0));
        assert!(p.note.contains("earlier repair"), "{}", p.note);
        let again = plan(&Ctx { retry_failed: true, ..repair }, &b);
        assert_eq!((again.status, again.actions[0].seq), (Status::Repair, 3));
        b.stripe = Some(10);
        assert_eq!(plan(&repair, &b).status, Status::Ok);
        // Lost usage older than Stripe's window cannot be pushed again.
        let mut old = bucket(10, vec![&settled]);
        old.start = NOW - 40 * 86_400 - 1800;
        old.end = old.start + 3600;
        old.stripe = Some(0);
        let p = plan(&repair, &old);
        assert_eq!((p.status, p.unbilled, p.actions.len()), (Status::TooOldForStripe, 10, 0));
    }

    #[test]
    fn stripe_above_the_ledger_after_a_cancel_is_lag_until_settled() {
        let e = plan(&ctx(), &bucket(10, vec![])).actions[0].clone();
        let pushed = done(e.clone(), NOW - 3 * 3600);
        let c = plan(&ctx(), &bucket(7, vec![&pushed])).actions[0].clone();
        let cancel = done(c, NOW - 60);
        let again = done(plan(&ctx(), &bucket(7, vec![&pushed, &cancel])).actions[0].clone(), NOW - 30);
        let mut b = bucket(7, vec![&pushed, &cancel, &again]);
        b.stripe = Some(17);
        assert_eq!(plan(&ctx(), &b).status, Status::StripeLagging);
        let late = Ctx { now: NOW + 7200, ..ctx() };
        let p = plan(&late, &b);
        assert_eq!((p.status, p.needs_credit), (Status::StripeAhead, 10));
    }

    #[test]
    fn legacy_usage_before_the_current_period_is_period_closed() {
        let legacy = Ctx { mode: "legacy", can_cancel: false, ..ctx() };
        let mut b = bucket(10, vec![]);
        b.open_from = Some(H + 3600);
        let p = plan(&legacy, &b);
        assert_eq!((p.status, p.unbilled, p.actions.len()), (Status::PeriodClosed, 10, 0));
        b.open_from = Some(H);
        assert_eq!(plan(&legacy, &b).status, Status::Push);
        // A bucket straddling the period start is written at the start, not lost.
        b.open_from = Some(H + 1383);
        let p = plan(&legacy, &b);
        assert_eq!((p.status, p.actions[0].event_ts), (Status::Push, H + 1383));
        // Legacy usage records have no 35-day rule, only the period.
        let mut old = bucket(3, vec![]);
        old.start = NOW - 40 * 86_400 - 1800;
        old.end = old.start + 3600;
        old.open_from = Some(old.start);
        assert_eq!(plan(&legacy, &old).status, Status::Push);
        let mut u = bucket(40, vec![]);
        u.unique = true;
        u.start = NOW - 1800 - 10 * 86_400;
        u.end = NOW - 1800 + 3600;
        u.open_from = Some(NOW + 3600);
        let p = plan(&legacy, &u);
        assert_eq!((p.status, p.unbilled), (Status::PeriodClosed, 40));
    }

    #[test]
    fn meters_usage_before_a_finalized_invoice_is_period_closed() {
        let mut b = bucket(10, vec![]);
        b.open_from = Some(H + 3600);
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.unbilled, p.actions.len()), (Status::PeriodClosed, 10, 0));
        assert!(p.note.contains("finalized the invoice"), "{}", p.note);
        b.open_from = Some(H);
        assert_eq!(plan(&ctx(), &b).status, Status::Push);
        // A bucket straddling the end of the finalized period is written after it: billed.
        b.open_from = Some(H + 1383);
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.actions[0].event_ts), (Status::Push, H + 1383));
        // Stripe's 35-day window still applies after an invoice's period.
        let mut old = bucket(3, vec![]);
        old.start = NOW - 40 * 86_400 - 1800;
        old.end = old.start + 3600;
        old.open_from = Some(old.start - 86_400);
        assert_eq!(plan(&ctx(), &old).status, Status::TooOldForStripe);
        // A straddling old bucket is written at the later of the two limits.
        let oldest_allowed = NOW - MAX_EVENT_AGE_SECS + AGE_MARGIN_SECS;
        old.start = oldest_allowed - 1800;
        old.end = old.start + 3600;
        old.open_from = Some(old.start + 60);
        let p = plan(&ctx(), &old);
        assert_eq!((p.status, p.actions[0].event_ts), (Status::Push, oldest_allowed));
        old.open_from = Some(oldest_allowed + 60);
        assert_eq!(plan(&ctx(), &old).actions[0].event_ts, oldest_allowed + 60);
        // A unique meter's value for a period whose invoice is final cannot be set any more.
        let mut u = bucket(40, vec![]);
        u.unique = true;
        u.start = NOW - 1800 - 40 * 86_400;
        u.end = NOW - 1800 - 9 * 86_400;
        u.open_from = Some(u.end);
        let p = plan(&ctx(), &u);
        assert_eq!((p.status, p.unbilled), (Status::PeriodClosed, 40));
        u.open_from = Some(u.start);
        assert_eq!(plan(&ctx(), &u).status, Status::Push);
    }

    #[test]
    fn meters_over_reports_on_a_finalized_invoice_take_a_credit_not_a_cancel() {
        // Pushed an hour ago (within Stripe's 24 h cancel window), then tally went down.
        let pushed = done(plan(&ctx(), &bucket(100, vec![])).actions[0].clone(), NOW - 3600);
        let mut b = bucket(90, vec![&pushed]);
        // The period is still open: cancel, then push the new value.
        b.open_from = Some(H);
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.actions[0].action), (Status::Correct, Action::Cancel));
        // Its invoice is final: a cancel would change no invoice, and a push again would not be
        // billed; the customer was billed 10 too many.
        b.open_from = Some(H + 3600);
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.needs_credit, p.actions.len()), (Status::NeedsCredit, 10, 0));
        // The invoice billed what Stripe held: had it dropped 40 of the 100, tally's 90 is 30
        // more than was billed, not 10 less.
        b.stripe = Some(60);
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.unbilled, p.needs_credit, p.actions.len()), (Status::PeriodClosed, 30, 0, 0));
        b.stripe = Some(90);
        assert_eq!(plan(&ctx(), &b).status, Status::Ok);
        b.stripe = Some(100);
        assert_eq!(plan(&ctx(), &b).needs_credit, 10);
        b.stripe = None;
        // A unique meter's lower value after the invoice: a credit, not a closed push of 0.
        let mut u = bucket(40, vec![]);
        u.unique = true;
        u.start = NOW - 1800 - 20 * 86_400;
        u.end = NOW - 1800 - 9 * 86_400;
        let set = done(plan(&ctx(), &u).actions[0].clone(), NOW - 10 * 86_400);
        u.pushes = vec![&set];
        u.tally = 35;
        u.stripe = Some(40);
        u.open_from = Some(u.end);
        let p = plan(&ctx(), &u);
        assert_eq!((p.status, p.needs_credit, p.actions.len()), (Status::NeedsCredit, 5, 0));
        // A higher value after the invoice is usage no invoice bills.
        u.tally = 47;
        let p = plan(&ctx(), &u);
        assert_eq!((p.status, p.unbilled), (Status::PeriodClosed, 7));
        // A value Stripe lost in a closed period: period_closed, not stripe_missing (a repair
        // could not set it again).
        u.tally = 40;
        u.stripe = Some(0);
        let p = plan(&ctx(), &u);
        assert_eq!((p.status, p.unbilled), (Status::PeriodClosed, 40), "{}", p.note);
    }

    /// A write for a closed period is billed only if it landed before Stripe finalized the
    /// invoice: after its intent, before its answer.
    #[test]
    fn meters_writes_landing_after_the_finalization_are_billed_by_no_invoice() {
        // The bucket's period ended at H + 3600; Stripe finalized its invoice an hour later.
        let fin = H + 7200;
        let closed = |b: &mut Bucket| {
            b.open_from = Some(H + 3600);
            b.finals = vec![FinalPeriod { start: H - 86_400, end: H + 3600, finalized_at: Some(fin) }];
        };
        let at = |e: Entry, intent: i64, answer: i64| Push {
            entry: e,
            outcome: Outcome::Done,
            intent_at: intent,
            done_at: Some(answer),
            run_id: "r".into(),
        };
        let first = plan(&ctx(), &bucket(100, vec![])).actions[0].clone();
        // Landed before: billed, as before.
        let on_time = at(first.clone(), fin - 60, fin - 1);
        let mut b = bucket(100, vec![&on_time]);
        closed(&mut b);
        b.stripe = Some(100);
        assert_eq!(plan(&ctx(), &b).status, Status::Ok);
        // Planned after the finalization (a slow run): Stripe holds it, no invoice bills it.
        let late = at(first.clone(), fin + 1, fin + 2);
        b.pushes = vec![&late];
        let p = plan(&ctx(), &b);
        assert_eq!(
            (p.status, p.ledger, p.unbilled, p.actions.len()),
            (Status::PeriodClosed, 100, 100, 0),
            "{}",
            p.note
        );
        assert!(p.note.contains(&first.push_id), "{}", p.note);
        // Within the clocks' tolerance of the finalization: not judged either way.
        let near = Ctx { landing_tolerance_secs: 120, ..ctx() };
        assert_eq!(plan(&near, &b).status, Status::Unresolved, "intent 1 s after, within 120 s");
        b.pushes = vec![&on_time];
        assert_eq!(plan(&ctx(), &b).status, Status::Ok);
        assert_eq!(plan(&near, &b).status, Status::Unresolved, "answered 1 s before, within 120 s");
        // Sent before and answered after (a pending write resent): only the invoice can say.
        let unsure = at(first.clone(), fin - 60, fin + 60);
        b.pushes = vec![&unsure];
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.actions.len()), (Status::Unresolved, 0), "{}", p.note);
        assert!(p.note.contains(&first.push_id), "{}", p.note);
        // A draft within the margin (no finalization time yet): every write so far is on it.
        b.finals[0].finalized_at = None;
        assert_eq!(plan(&ctx(), &b).status, Status::Ok);
        // So is an older draft held after the next invoice was finalized: the write is judged
        // by its own invoice, not the next one (found by a review).
        let held = FinalPeriod { start: H - 86_400, end: H + 3600, finalized_at: None };
        b.finals = vec![held, FinalPeriod { start: H + 3600, end: H + 7200, finalized_at: Some(fin) }];
        b.open_from = Some(H + 7200);
        assert_eq!(plan(&ctx(), &b).status, Status::Ok);
        closed(&mut b);
        // Late events pushed on time, then more late: only the late push is unbilled.
        let e2 = plan(&ctx(), &bucket(130, vec![&on_time])).actions[0].clone();
        let late2 = at(e2, fin + 10, fin + 11);
        b.pushes = vec![&on_time, &late2];
        b.tally = 130;
        b.stripe = Some(130);
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.ledger, p.unbilled), (Status::PeriodClosed, 130, 30), "{}", p.note);
        // A cancel landing after the finalization leaves its push billed: tally went down to 60,
        // the push of 100 was cancelled late and 60 pushed late; the invoice billed 100.
        let id = |n: &str| format!("{}-{n}", first.push_id);
        let cancel =
            Entry { push_id: id("c"), action: Action::Cancel, seq: 2, cancels: first.push_id.clone(), ..first.clone() };
        let repush = Entry { push_id: id("p"), seq: 3, value: 60, ..first.clone() };
        let (cancel, repush) = (at(cancel, fin + 5, fin + 6), at(repush, fin + 7, fin + 8));
        b.pushes = vec![&on_time, &cancel, &repush];
        b.tally = 60;
        b.stripe = Some(60);
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.needs_credit), (Status::NeedsCredit, 40), "{}", p.note);
        // A repair landing late: the loss it made up stays unbilled.
        let repair = Entry { push_id: id("r"), action: Action::Repair, seq: 2, value: 25, ..first.clone() };
        let repair = at(repair, fin + 5, fin + 6);
        b.pushes = vec![&on_time, &repair];
        b.tally = 100;
        b.stripe = Some(100);
        let p = plan(&ctx(), &b);
        assert_eq!((p.status, p.unbilled), (Status::PeriodClosed, 25), "{}", p.note);
        // A bucket straddling the period's end: what a late write missed is pushed after the end.
        let mut s = bucket(100, vec![&late]);
        s.open_from = Some(H + 1800);
        s.finals = vec![FinalPeriod { start: H - 86_400, end: H + 1800, finalized_at: Some(fin) }];
        let p = plan(&ctx(), &s);
        assert_eq!((p.status, p.actions.len()), (Status::Push, 1), "{}", p.note);
        assert_eq!((p.actions[0].value, p.actions[0].event_ts), (100, H + 1800));
        let after = done(p.actions[0].clone(), NOW - 8000);
        s.pushes = vec![&late, &after];
        s.stripe = Some(200);
        assert_eq!(plan(&ctx(), &s).status, Status::Ok, "billed once, after the end");
        // Stripe's drop of the push after the end is still seen (found by a review).
        s.stripe = Some(100);
        let settled = Ctx { settle_secs: 3600, ..ctx() };
        let p = plan(&settled, &s);
        assert_eq!((p.status, p.unbilled), (Status::StripeMissing, 100), "{}", p.note);
        // And an over-report cancels the push after the end, which the next invoice bills.
        s.stripe = Some(200);
        s.tally = 80;
        let p = plan(&ctx(), &s);
        assert_eq!(
            (p.status, p.actions.len(), p.actions[0].cancels.as_str()),
            (Status::Correct, 1, after.entry.push_id.as_str()),
            "{}",
            p.note
        );
        // Writes of the open period are judged as before.
        let mut o = bucket(100, vec![&late]);
        o.finals = s.finals.clone();
        o.open_from = Some(H);
        o.stripe = Some(100);
        assert_eq!(plan(&ctx(), &o).status, Status::Ok);
        // A unique meter whose last value was set late: the invoice billed the one before.
        let mut u = bucket(40, vec![]);
        u.unique = true;
        let set1 = plan(&ctx(), &u).actions[0].clone();
        let set2 = Entry {
            push_id: format!("{}-2", set1.push_id),
            seq: 2,
            value: 55,
            event_ts: set1.event_ts + 1,
            ..set1.clone()
        };
        let (set1, set2) = (at(set1, fin - 100, fin - 99), at(set2, fin + 1, fin + 2));
        u.pushes = vec![&set1, &set2];
        u.tally = 55;
        u.stripe = Some(55);
        closed(&mut u);
        let p = plan(&ctx(), &u);
        assert_eq!((p.status, p.unbilled, p.actions.len()), (Status::PeriodClosed, 15, 0), "{}", p.note);
    }

    #[test]
    fn a_lost_last_value_is_set_again() {
        let mut b = bucket(40, vec![]);
        b.unique = true;
        b.start = NOW - 1800 - 10 * 86_400;
        b.end = NOW - 1800 + 3600;
        let first = done(plan(&ctx(), &b).actions[0].clone(), NOW - 3 * 3600);
        b.pushes = vec![&first];
        b.stripe = Some(0);
        assert_eq!((plan(&ctx(), &b).status, plan(&ctx(), &b).unbilled), (Status::StripeMissing, 40));
        let p = plan(&Ctx { repair_missing: true, ..ctx() }, &b);
        let a = &p.actions[0];
        assert_eq!((p.status, p.unbilled, a.action, a.value, a.seq), (Status::Repair, 40, Action::Set, 40, 2));
        assert!(a.event_ts > first.entry.event_ts && a.reason.starts_with("repair:"));
        // The re-set lost too: a person looks first.
        let reset = done(a.clone(), NOW - 7200);
        b.pushes = vec![&first, &reset];
        let p = plan(&Ctx { repair_missing: true, ..ctx() }, &b);
        assert_eq!((p.status, p.actions.len()), (Status::StripeMissing, 0));
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

    fn item<'a>(pushes: Vec<&'a Push>, periods: Vec<(i64, i64, u64)>, current: (i64, i64)) -> Item<'a> {
        Item {
            org_id: "o".into(),
            meter: "events".into(),
            target: Target { customer: "cus_1".into(), target: "si_1".into(), event_name: String::new() },
            unique: false,
            periods,
            current,
            pushes,
            period: (H - 10 * 86_400, H + 86_400),
            bucket_secs: 3600,
        }
    }

    #[test]
    fn legacy_items_are_compared_period_by_period() {
        let legacy = Ctx { mode: "legacy", can_cancel: false, settle_secs: 0, ..ctx() };
        let cur = (H - 5 * 86_400, H + 26 * 86_400);
        let old = (cur.0 - 31 * 86_400, cur.0);
        let mk = |start: i64, value: u64, seq: u32| {
            let mut e = plan(&ctx(), &bucket(value, vec![])).actions[0].clone();
            e.bucket_start = start;
            e.bucket_end = start + 3600;
            e.event_ts = start;
            e.seq = seq;
            e.push_id = format!("p{start}{seq}");
            done(e, NOW - 60)
        };
        let (a, b2, c) = (mk(H, 10, 1), mk(H, 5, 2), mk(old.1 - 3600, 7, 1));
        // Stripe holds it all: nothing to say.
        let all = item(vec![&a, &b2, &c], vec![(cur.0, cur.1, 15), (old.0, old.1, 7)], cur);
        assert_eq!(check_item(&legacy, &all), vec![]);
        // Within the settle time a shortfall is lag.
        let short = item(vec![&a, &b2, &c], vec![(cur.0, cur.1, 10), (old.0, old.1, 3)], cur);
        let lag = check_item(&Ctx { settle_secs: 7200, ..legacy }, &short);
        assert!(lag.iter().all(|c| c.plan.status == Status::StripeLagging), "{lag:?}");
        // After it: missing in the current period, period_closed in the closed one.
        let mut got = check_item(&legacy, &short);
        got.sort_by_key(|c| c.start);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].start, got[0].plan.status, got[0].plan.unbilled), (old.0, Status::PeriodClosed, 4));
        assert_eq!((got[1].start, got[1].plan.status, got[1].plan.unbilled), (cur.0, Status::StripeMissing, 5));
        // Repaired by an increment of exactly the missing amount, in the latest write's bucket.
        let repair = Ctx { repair_missing: true, ..legacy };
        let r = check_item(&repair, &short).into_iter().find(|c| c.start == cur.0).unwrap();
        let e = &r.plan.actions[0];
        assert_eq!(
            (r.plan.status, e.action, e.value, e.bucket_start, e.seq),
            (Status::Repair, Action::Repair, 5, H, 3)
        );
        // The repair restores Stripe, and does not count as usage pushed.
        let fixed = mk(H, 5, 3);
        let fixed = Push { entry: Entry { action: Action::Repair, ..fixed.entry.clone() }, ..fixed };
        let whole = item(vec![&a, &b2, &c, &fixed], vec![(cur.0, cur.1, 15), (old.0, old.1, 7)], cur);
        assert_eq!(check_item(&repair, &whole), vec![]);
        // Nothing listed by Stripe at all: everything pushed is missing (current) or closed.
        let none = item(vec![&a, &c], vec![], cur);
        let mut got = check_item(&legacy, &none);
        got.sort_by_key(|c| c.plan.status);
        assert_eq!(
            got.iter().map(|c| (c.plan.status, c.plan.unbilled)).collect::<Vec<_>>(),
            vec![(Status::PeriodClosed, 7), (Status::StripeMissing, 10)]
        );
        // A period that does not overlap the reconciled one is not judged (its writes are partial).
        let far = (old.0 - 31 * 86_400, old.0);
        let c2 = mk(far.1 - 3600, 7, 1);
        let partial = item(vec![&a, &b2, &c2], vec![(cur.0, cur.1, 15), (far.0, far.1, 1000)], cur);
        assert_eq!(check_item(&legacy, &partial), vec![]);
        // Written every hour: the settled writes alone still show a loss (a lower bound of it).
        let mut z = mk(H - 7 * 3600, 4, 1);
        z.done_at = Some(NOW - 8000);
        let busy = item(vec![&a, &z], vec![(cur.0, cur.1, 3)], cur);
        let got = check_item(&Ctx { settle_secs: 7200, ..legacy }, &busy);
        assert_eq!(
            got.iter().map(|c| (c.plan.status, c.plan.unbilled)).collect::<Vec<_>>(),
            vec![(Status::StripeMissing, 1)]
        );
        // A repair Stripe refused is not sent again without --retry-failed.
        let mut refused = mk(H, 5, 3);
        refused.entry.action = Action::Repair;
        refused.entry.reason = "repair: ...".into();
        refused.outcome = Outcome::Failed("refused: no such customer".into());
        let after = item(vec![&a, &b2, &c, &refused], vec![(cur.0, cur.1, 10), (old.0, old.1, 7)], cur);
        let r = check_item(&repair, &after).into_iter().find(|c| c.start == cur.0).unwrap();
        assert_eq!((r.plan.status, r.plan.actions.len()), (Status::StripeMissing, 0));
        let r =
            check_item(&Ctx { retry_failed: true, ..repair }, &after).into_iter().find(|c| c.start == cur.0).unwrap();
        assert_eq!((r.plan.status, r.plan.actions[0].seq), (Status::Repair, 4));
        // More than pushed: another system's usage.
        let more = item(vec![&a, &b2], vec![(cur.0, cur.1, 20)], cur);
        let got = check_item(&legacy, &more);
        assert_eq!((got[0].plan.status, got[0].plan.needs_credit), (Status::StripeAhead, 5));
    }

    /// A refused pair's bucket writes nothing, whatever tally and the ledger say, reports the
    /// ledger's value, and makes the run exit 1.
    #[test]
    fn a_bucket_of_a_pair_whose_total_overflows_writes_nothing() {
        let c = ctx();
        let b0 = bucket(10, vec![]);
        let pushed = done(plan(&c, &b0).actions[0].clone(), NOW - 100);
        for (tally, pushes) in [(10, vec![]), (25, vec![&pushed]), (3, vec![&pushed])] {
            let mut b = bucket(tally, pushes);
            assert!(!plan(&c, &b).actions.is_empty(), "without the refusal, a write is planned");
            b.overflow = Some("o/p/events at hour H = 18446744073709551616".into());
            let p = plan(&c, &b);
            assert_eq!(p.status, Status::TotalOverflow);
            assert!(p.actions.is_empty(), "{p:?}");
            assert_eq!(p.ledger, if b.pushes.is_empty() { 0 } else { 10 });
            assert!(p.note.contains("18446744073709551616"));
            assert!(p.status.is_error() && !p.status.settled());
        }
        let mut u = bucket(7, vec![]);
        u.unique = true;
        u.overflow = Some("the pair's additive meter overflowed".into());
        assert_eq!(plan(&c, &u).status, Status::TotalOverflow);
        // Unmapped, it is still refused (its tally was taken out: it would read `ok`).
        let mut n = bucket(0, vec![]);
        n.target = None;
        n.overflow = Some("overflowed".into());
        assert_eq!(plan(&c, &n).status, Status::TotalOverflow);
        // A write an earlier run left pending is resent first: the bucket says so.
        let pending = Push { outcome: Outcome::Pending, done_at: None, ..pushed.clone() };
        let mut p = bucket(25, vec![&pending]);
        p.overflow = Some("overflowed".into());
        assert_eq!(plan(&c, &p).status, Status::Pending);
    }
}
