//! Meters mode: which billing periods Stripe has already invoiced for good.
//!
//! Stripe takes meter events for 35 days, but a subscription's cycle invoice bills only the usage
//! it holds when it is finalized (about an hour after the period ends; Stripe: "Usage-based
//! billing", "Subscription invoices"). A meter event for an earlier period sent after that is
//! accepted and shows in the meter's summaries, yet no invoice ever bills it. So, per customer,
//! tally reads the subscriptions whose metered prices bill a Stripe meter, and their invoices: the
//! latest `period_end` of an invoice that is no longer a `draft` (`open`, `paid`,
//! `uncollectible` or `void`) is where that (customer, meter) is open from. Usage before it is
//! reported `period_closed`, as legacy mode does before the subscription's current period.
//!
//! The rule is a threshold, not a set of periods: an older cycle invoice kept in draft
//! (`auto_advance=false`) after a newer one was finalized counts as closed too.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::client::{StripeError, StripeHttp};
use crate::stripe_emu::form::encode as enc;

#[derive(Debug, Deserialize)]
struct Subscription {
    id: String,
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
    /// End of the usage period the invoice bills (it looks back one period for a subscription
    /// invoice: Stripe API, "The Invoice object").
    period_end: i64,
}

/// For `customer`: Stripe meter id → the end of the latest usage period Stripe has finalized an
/// invoice for, over the customer's subscriptions whose metered prices bill that meter
/// (`recurring.meter`). A meter no subscription bills is absent. Two requests per subscription
/// (more for long lists), every page read.
pub fn finalized_until(c: &StripeHttp, customer: &str) -> Result<BTreeMap<String, i64>, StripeError> {
    let subs: Vec<Subscription> =
        c.list_all("/subscriptions", &format!("customer={}&status=all", enc(customer)), |s: &Subscription| {
            s.id.clone()
        })?;
    let mut out: BTreeMap<String, i64> = BTreeMap::new();
    for sub in subs {
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
        let Some(until) = invoices.iter().filter(|i| is_finalized(i.status.as_deref())).map(|i| i.period_end).max()
        else {
            continue;
        };
        for m in meters {
            let e = out.entry(m).or_insert(until);
            *e = (*e).max(until);
        }
    }
    Ok(out)
}

/// Whether an invoice's usage is settled: finalized (`open`, `paid`, `uncollectible`) or voided
/// after finalization. A `draft` still takes usage; a deleted draft (no status) bills nothing
/// and closes nothing.
fn is_finalized(status: Option<&str>) -> bool {
    matches!(status, Some("open" | "paid" | "uncollectible" | "void"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_invoices_past_draft_close_their_period() {
        for (s, closed) in [
            (Some("draft"), false),
            (Some("open"), true),
            (Some("paid"), true),
            (Some("uncollectible"), true),
            (Some("void"), true),
            (None, false),
        ] {
            assert_eq!(is_finalized(s), closed, "{s:?}");
        }
    }
}
