//! Meters mode: which billing periods Stripe has already invoiced for good.
//!
//! Stripe takes meter events for 35 days, but a subscription's cycle invoice bills only the usage
//! it holds when it is finalized (about an hour after the period ends; Stripe: "Usage-based
//! billing", "Subscription invoices"). A meter event for an earlier period sent after that is
//! accepted and shows in the meter's summaries, yet no invoice ever bills it. So, per customer,
//! tally reads the subscriptions whose metered prices bill a Stripe meter, and their cycle
//! invoices (`billing_reason = subscription_cycle`, whose `period_end` is the end of the billing
//! period they bill): the latest `period_end` of such an invoice that is no longer a `draft`
//! (`open`, `paid`, `uncollectible` or `void`), or that Stripe finalizes within
//! [`FINALIZE_MARGIN_SECS`], is where that (customer, meter) is open from. Usage before it is
//! reported `period_closed`, as legacy mode does before the subscription's current period.
//!
//! Other invoices close nothing: a `subscription_update`, `manual` or threshold invoice has an
//! empty period at its creation (`period_start = period_end`), and the running period's metered
//! usage is billed by the next cycle invoice; a `subscription_create` invoice bills no usage.
//! Subscriptions that never started (`incomplete`, `incomplete_expired`) bill nothing.
//!
//! Each closing invoice is also kept as a [`FinalPeriod`] with Stripe's finalization time
//! (`status_transitions.finalized_at`): a write for a closed period counts on its invoice only if
//! it landed before that time (`plan::Landing`). A write planned while the invoice was a draft
//! can land after it: a slow run, or an earlier run's pending write resent after the
//! finalization.
//!
//! Limits: the rule is a threshold, not a set of periods (an older cycle invoice kept in draft,
//! `auto_advance=false`, after a newer one was finalized counts as closed too); usage after a
//! subscription ended is billed by nothing and is not flagged.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::client::{StripeError, StripeHttp};
use crate::stripe_emu::form::encode as enc;

/// The default of `stripe.finalize_margin_secs`: a draft cycle invoice that Stripe finalizes
/// within this long (`automatically_finalizes_at`, the invoicer's clock) counts as finalized, as a
/// push planned now could land after it.
pub const FINALIZE_MARGIN_SECS: i64 = 15 * 60;

/// A billing period of a cycle invoice, for one meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinalPeriod {
    /// The usage period the invoice bills, Unix seconds, `[start, end)`.
    pub start: i64,
    pub end: i64,
    /// When Stripe finalized it (`status_transitions.finalized_at`, Stripe's clock); `None` for
    /// a draft (one inside the margin counts as closed, but every write so far is on it).
    pub finalized_at: Option<i64>,
}

/// What a customer's invoices closed for one Stripe meter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closed {
    /// The latest end of a closed period: usage before it is billed by no future invoice.
    pub until: i64,
    /// Every cycle invoice's period, by `end`: the closed ones, and drafts (`finalized_at` `None`;
    /// an older one held after a newer invoice was finalized is before `until`).
    pub periods: Vec<FinalPeriod>,
}

/// Of `periods` (a [`Closed::periods`] list, or part of it), the one whose invoice bills a meter
/// event at `ts`: the earliest that ends after it (a timestamp in a gap between periods is billed
/// by the next invoice). `None` if `ts` is at or after the last end.
pub fn period_of(periods: &[FinalPeriod], ts: i64) -> Option<&FinalPeriod> {
    periods.iter().filter(|p| p.end > ts).min_by_key(|p| p.end)
}

#[derive(Debug, Deserialize)]
struct Subscription {
    id: String,
    status: String,
    items: ItemList,
}

#[derive(Debug, Deserialize)]
struct ItemList {
    data: Vec<Item>,
    #[serde(default)]
    has_more: bool,
}

#[derive(Debug, Deserialize)]
struct Item {
    id: String,
    price: Price,
}

#[derive(Debug, Deserialize)]
struct Price {
    recurring: Option<Recurring>,
}

#[derive(Debug, Deserialize)]
struct Recurring {
    meter: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Invoice {
    id: String,
    /// `draft`, `open`, `paid`, `uncollectible` or `void`; null only for a deleted draft.
    status: Option<String>,
    billing_reason: Option<String>,
    /// When Stripe finalizes a draft on its own (null for others, and for drafts with
    /// `auto_advance=false`).
    automatically_finalizes_at: Option<i64>,
    /// The usage period the invoice bills (it looks back one period for a subscription invoice:
    /// Stripe API, "The Invoice object").
    period_start: i64,
    period_end: i64,
    status_transitions: Option<StatusTransitions>,
}

#[derive(Debug, Default, Deserialize)]
struct StatusTransitions {
    finalized_at: Option<i64>,
}

/// For `customer` at `now` (Unix seconds): Stripe meter id → the billing periods Stripe has
/// finalized a cycle invoice for (or finalizes within `margin_secs`), over the customer's
/// subscriptions whose metered prices bill that meter (`recurring.meter`). A meter no
/// subscription bills, or none with a closed period, is absent. Requests: one list of the
/// customer's subscriptions, and one list of invoices per subscription with a metered price
/// (more for long lists).
pub fn finalized(
    c: &StripeHttp,
    customer: &str,
    now: i64,
    margin_secs: i64,
) -> Result<BTreeMap<String, Closed>, StripeError> {
    let subs: Vec<Subscription> =
        c.list_all("/subscriptions", &format!("customer={}&status=all", enc(customer)), |s: &Subscription| {
            s.id.clone()
        })?;
    let mut out: BTreeMap<String, Closed> = BTreeMap::new();
    for sub in subs {
        if matches!(sub.status.as_str(), "incomplete" | "incomplete_expired") {
            continue;
        }
        let items = if sub.items.has_more {
            c.list_all("/subscription_items", &format!("subscription={}", enc(&sub.id)), |i: &Item| i.id.clone())?
        } else {
            sub.items.data
        };
        let meters: Vec<String> = items.into_iter().filter_map(|i| i.price.recurring?.meter).collect();
        if meters.is_empty() {
            continue;
        }
        let invoices: Vec<Invoice> =
            c.list_all("/invoices", &format!("subscription={}", enc(&sub.id)), |i: &Invoice| i.id.clone())?;
        let Some(until) = invoices.iter().filter(|i| closes(i, now, margin_secs)).map(|i| i.period_end).max() else {
            continue;
        };
        // Every cycle invoice's period, drafts too: a write for an older draft held after a
        // newer invoice was finalized is judged by that draft (not finalized: on it), not by the
        // newer invoice.
        let periods: Vec<FinalPeriod> = invoices
            .iter()
            .filter(|i| i.billing_reason.as_deref() == Some("subscription_cycle") && i.status.is_some())
            .map(|i| FinalPeriod {
                start: i.period_start,
                end: i.period_end,
                finalized_at: if i.status.as_deref() == Some("draft") {
                    None
                } else {
                    i.status_transitions.as_ref().and_then(|t| t.finalized_at)
                },
            })
            .collect();
        for m in meters {
            let e = out.entry(m).or_default();
            e.periods.extend(&periods);
            e.periods.sort_by_key(|p| (p.end, p.start));
            e.until = e.until.max(until);
        }
    }
    Ok(out)
}

/// Whether `invoice` closes the billing period it bills, at `now`: a cycle invoice finalized
/// (`open`, `paid`, `uncollectible`) or voided after finalization, or a draft Stripe finalizes
/// within `margin_secs`. A deleted draft (no status) closes nothing.
fn closes(invoice: &Invoice, now: i64, margin_secs: i64) -> bool {
    if invoice.billing_reason.as_deref() != Some("subscription_cycle") {
        return false;
    }
    match invoice.status.as_deref() {
        Some("open" | "paid" | "uncollectible" | "void") => true,
        Some("draft") => invoice.automatically_finalizes_at.is_some_and(|t| t <= now + margin_secs),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invoice(status: Option<&str>, reason: &str, finalizes_at: Option<i64>) -> Invoice {
        Invoice {
            id: "in_1".into(),
            status: status.map(str::to_string),
            billing_reason: Some(reason.into()),
            automatically_finalizes_at: finalizes_at,
            period_start: 0,
            period_end: 1_000,
            status_transitions: None,
        }
    }

    #[test]
    fn only_cycle_invoices_past_draft_close_their_period() {
        let now = 10_000;
        for (s, closed) in [
            (Some("draft"), false),
            (Some("open"), true),
            (Some("paid"), true),
            (Some("uncollectible"), true),
            (Some("void"), true),
            (None, false),
        ] {
            assert_eq!(closes(&invoice(s, "subscription_cycle", None), now, FINALIZE_MARGIN_SECS), closed, "{s:?}");
        }
        // An update, manual, threshold or create invoice bills no running period's usage.
        for reason in ["subscription_update", "manual", "subscription_threshold", "subscription_create"] {
            assert!(!closes(&invoice(Some("paid"), reason, None), now, FINALIZE_MARGIN_SECS), "{reason}");
        }
        // A draft about to be finalized counts as finalized: a push could land after it.
        let soon = now + FINALIZE_MARGIN_SECS;
        assert!(closes(&invoice(Some("draft"), "subscription_cycle", Some(soon)), now, FINALIZE_MARGIN_SECS));
        assert!(!closes(&invoice(Some("draft"), "subscription_cycle", Some(soon + 1)), now, FINALIZE_MARGIN_SECS));
        // The margin is the configured one.
        assert!(closes(&invoice(Some("draft"), "subscription_cycle", Some(now + 60)), now, 60));
        assert!(!closes(&invoice(Some("draft"), "subscription_cycle", Some(now + 61)), now, 60));
    }

    #[test]
    fn a_timestamp_belongs_to_the_earliest_closed_period_that_ends_after_it() {
        let p = |start, end| FinalPeriod { start, end, finalized_at: Some(end + 3600) };
        let c = Closed { until: 300, periods: vec![p(0, 100), p(100, 200), p(250, 300)] };
        assert_eq!(period_of(&c.periods, 0), Some(&p(0, 100)));
        assert_eq!(period_of(&c.periods, 99), Some(&p(0, 100)));
        assert_eq!(period_of(&c.periods, 100), Some(&p(100, 200)));
        assert_eq!(period_of(&c.periods, 220), Some(&p(250, 300)), "a gap is billed by the next invoice");
        assert_eq!(period_of(&c.periods, 300), None);
    }
}
